"""Speech as LibriSpeech folders of FLAC: ``flite`` voices reading Ding sentences.

The four 16 kHz flite voices are speakers 101-104 in every split (LibriSpeech keeps speakers
apart; four voices are too few for that). Sentences are disjoint across splits.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.starter.common import Size, progress, seeded, shuffled, take_splits
from pipelines.starter.ding import ding_english, ding_sentence_pairs

SAMPLE_RATE = 16_000
# flite's 16 kHz voices (kal is 8 kHz and robotic) as LibriSpeech speaker ids.
VOICES = {"kal16": 101, "awb": 102, "rms": 103, "slt": 104}
CHAPTERS = {"train": 1, "dev": 2, "test": 3}
SPOKEN_AS_SOMETHING_ELSE = {"mr", "mrs", "ms", "dr", "st", "jr", "etc", "vs"}


def speakable(sentence: str) -> bool:
    """Sentences flite reads exactly as written: no digits, symbols, acronyms or abbreviations."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z ,.?!;:'’-]*", sentence):
        return False
    words = sentence.split()
    if any(w.rstrip(".,?!;:").isupper() and len(w.rstrip(".,?!;:")) > 1 for w in words):
        return False  # "USA", "OK": spelt out by flite
    if any(w.endswith(".") for w in words[:-1]):
        return False  # "Mr. Smith", "e.g. this"
    return not any(w.strip(".,?!;:").lower() in SPOKEN_AS_SOMETHING_ELSE for w in words)


def librispeech_transcript(sentence: str) -> str:
    """LibriSpeech style: upper case, apostrophes kept, other punctuation gone, hyphens split."""
    text = sentence.replace("’", "'").replace("-", " ")
    text = re.sub(r"[^A-Za-z' ]", " ", text)
    words = (word.strip("'") for word in text.upper().split())
    return " ".join(word for word in words if word)


def sox_to_16k(wav: Path) -> list[str]:
    """sox arguments that print the file as raw 16 kHz mono signed 16-bit samples on stdout."""
    return ["sox", str(wav), "-t", "raw", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed", "-"]


def synthesize(text: str, voice: str, flac: Path, scratch: Path) -> None:
    """flite speaks the text to a WAV; sox makes it 16 kHz mono 16-bit; soundfile writes FLAC."""
    import soundfile

    wav = scratch / (flac.stem + ".wav")
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
    raw = subprocess.run(sox_to_16k(wav), check=True, capture_output=True).stdout
    wav.unlink()
    soundfile.write(flac, np.frombuffer(raw, dtype="<i2"), SAMPLE_RATE, subtype="PCM_16", format="FLAC")


@dataclass(frozen=True)
class Utterance:
    id: str  # <speaker>-<chapter>-<utt:04d>
    voice: str
    sentence: str

    def chapter_dir(self, split_dir: Path) -> Path:
        speaker, chapter, _ = self.id.split("-")
        return split_dir / speaker / chapter


def plan_utterances(split: str, sentences: Sequence[str]) -> list[Utterance]:
    """Voices take turns (so speakers stay balanced); each speaker has one chapter per split."""
    voices = list(VOICES)
    utterances = []
    for i, sentence in enumerate(sentences):
        voice = voices[i % len(voices)]
        utterance_id = f"{VOICES[voice]}-{CHAPTERS[split]}-{i // len(voices):04d}"
        utterances.append(Utterance(utterance_id, voice, sentence))
    return utterances


def write_transcripts(split_dir: Path, utterances: Sequence[Utterance]) -> None:
    by_chapter: dict[Path, list[str]] = {}
    for utterance in utterances:
        line = f"{utterance.id} {librispeech_transcript(utterance.sentence)}"
        by_chapter.setdefault(utterance.chapter_dir(split_dir), []).append(line)
    for chapter_dir, lines in by_chapter.items():
        chapter_dir.mkdir(parents=True)
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def frequent_words(count: int | None) -> set[str] | None:
    """The `count` most frequent words of Ding's English sentences, as transcripts spell them."""
    if count is None:
        return None
    words = Counter(w for en, _ in ding_sentence_pairs() for w in librispeech_transcript(en).split())
    return {word for word, _ in words.most_common(count)}


def build_librispeech(dst: Path, size: Size, seed: int) -> dict[str, int]:
    vocabulary = frequent_words(size.speech_vocabulary)

    def usable(sentence: str) -> bool:
        words = librispeech_transcript(sentence).split()
        return bool(words) and (vocabulary is None or all(w in vocabulary for w in words))

    sentences = [s for s in ding_english(size.speech_words, keep=speakable) if usable(s)]
    splits = take_splits(shuffled(sentences, seeded(seed, "librispeech")), size.speech, "librispeech")

    jobs = []  # (text, voice, flac path)
    for split, split_sentences in splits.items():
        utterances = plan_utterances(split, utterances_of(split, size, split_sentences))
        write_transcripts(dst / split, utterances)
        for u in utterances:
            jobs.append((u.sentence.replace("’", "'"), u.voice, u.chapter_dir(dst / split) / f"{u.id}.flac"))

    # The work happens in the flite and sox child processes, so two threads keep both cores busy.
    with tempfile.TemporaryDirectory(prefix="starter-tts-") as scratch, ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda job: synthesize(*job, Path(scratch)), jobs)
        for _ in progress(done, "librispeech", total=len(jobs)):
            pass
    return {split: len(utterances_of(split, size, sentences)) for split, sentences in splits.items()}


def utterances_of(split: str, size: Size, sentences: Sequence[str]) -> list[str]:
    return [s for s in sentences for _ in range(size.speech_voices if split == "train" else 1)]
