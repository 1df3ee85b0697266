"""Plain descriptive English from WordNet: every verb in its own sentence frames, with WordNet nouns.

The embedder's text sources (WordNet glosses, two Bibles, the Python docs) hold little plain present-day
description of who does what ("A woman is slicing an onion."), the register of most queries and of
much everyday text. This module writes such sentences from WordNet alone (same licence as the glosses):
each verb synset lists the generic frames its senses take (wninput(5WN): 8 = "Somebody ----s
something", 2 = "Somebody ----s", ...); the slots are filled with nouns under person.n.01 ("somebody")
or the other physical entities ("something"), common nouns only (a frequent lemma's first two
senses, weighted by WordNet's sense-tagged counts); the verb is inflected by rule (present, progressive,
past), irregular verbs only in the forms that need no exception list. For a verb synset with several
lemmas, the same sentence with two of them is a paraphrase pair ("A man is fixing the car." / "A man is
repairing the car.").

Held-out synsets (the retrieval evaluation) lend no verb and no noun.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # corpus.build imports this module
    from .corpus import Synset

__all__ = ["FRAMES", "common_senses", "frame_sentences", "inflect"]

PERSON = "noun:00007846"  # person.n.01
PHYSICAL_ENTITY = "noun:00001930"  # physical_entity.n.01
PREPOSITIONS = ("in", "on", "at", "near", "across", "into", "over", "under", "along", "behind", "through")

# wninput(5WN) frame number -> template: S = somebody, T = something, V = the inflected verb,
# P = a preposition; only the frames whose slots are nouns
FRAMES: dict[int, str] = {
    1: "T V",
    2: "S V",
    4: "T V P T",
    8: "S V T",
    9: "S V S",
    10: "T V S",
    11: "T V T",
    13: "S V on T",
    15: "S V T to S",
    17: "S V S with T",
    20: "S V S P T",
    21: "S V T P T",
    22: "S V P T",
    27: "S V to S",
    31: "S V T with T",
}


def _is_consonant_vowel_consonant(word: str) -> bool:
    return re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", word) is not None


def inflect(verb: str, form: str) -> str:
    """The verb (possibly "take off": the first word inflects) in `form`: "3sg" (plays), "ing" (playing)
    or "ed" (played), by the regular spelling rules."""
    head, _, rest = verb.partition(" ")
    if form == "3sg":
        if re.search(r"(s|x|z|ch|sh|o)$", head):
            head += "es"
        elif re.search(r"[^aeiou]y$", head):
            head = head[:-1] + "ies"
        else:
            head += "s"
    elif form == "ing":
        if head.endswith("ie"):
            head = head[:-2] + "ying"
        elif head.endswith("e") and not re.search(r"(ee|ye|oe)$", head) and len(head) > 2:
            head = head[:-1] + "ing"
        elif _is_consonant_vowel_consonant(head):
            head += head[-1] + "ing"
        else:
            head += "ing"
    elif form == "ed":
        if head.endswith("e"):
            head += "d"
        elif re.search(r"[^aeiou]y$", head):
            head = head[:-1] + "ied"
        elif _is_consonant_vowel_consonant(head):
            head += head[-1] + "ed"
        else:
            head += "ed"
    else:
        raise ValueError(f"unknown verb form {form!r}")
    return f"{head} {rest}".strip()


def common_senses(root: str | Path, pos: str, min_tagged: int) -> dict[str, float]:
    """ "pos:offset lemma" -> weight for the common senses of common lemmas: a lemma whose sense-tagged count
    (``index.{pos}``: tagsense_cnt) is at least `min_tagged`, in its first two senses (WordNet lists a
    lemma's senses most frequent first); weight = the tagged count, halved for the second sense."""
    out: dict[str, float] = {}
    with open(Path(root) / "usr/share/wordnet" / f"index.{pos}", encoding="utf-8") as f:
        for line in f:
            if line.startswith(" "):
                continue
            fields = line.split()
            n_ptr = int(fields[3])
            tagged = int(fields[5 + n_ptr])
            if tagged < min_tagged:
                continue
            for rank, offset in enumerate(fields[6 + n_ptr : 8 + n_ptr]):
                out[f"{pos}:{offset} {fields[0].replace('_', ' ')}"] = tagged / (1 + rank)
    return out


def _descendants(root_id: str, by_id: dict[str, Synset]) -> set[str]:
    """Every synset under `root_id` by hyponym pointers (``~``, ``~i``), itself included."""
    seen, todo = {root_id}, [root_id]
    while todo:
        for sym, target in by_id[todo.pop()].pointers:
            if sym in ("~", "~i") and target not in seen and target in by_id:
                seen.add(target)
                todo.append(target)
    return seen


class _NounPool:
    """Weighted sampling of "a/the <noun>" phrases among the common senses of a set of noun synsets."""

    def __init__(self, synsets: Iterable[Synset], weights: dict[str, float]) -> None:
        self.words: list[str] = []
        self.cum: list[float] = []
        total = 0.0
        for s in synsets:
            for lemma in s.lemmas:
                weight = weights.get(f"{s.id} {lemma.lower()}", 0.0)
                if weight and re.fullmatch(r"[a-z][a-z -]*", lemma):  # no proper nouns, digits
                    total += weight
                    self.words.append(lemma)
                    self.cum.append(total)

    def phrase(self, rng: random.Random) -> str:
        word = rng.choices(self.words, cum_weights=self.cum)[0]
        det = rng.choice(("the", "a", "a", "his", "her", "their"))
        if det == "a" and word[0] in "aeiou":
            det = "an"
        return f"{det} {word}"


def _sentence(template: str, verb: str, form: str, people: _NounPool, things: _NounPool, rng) -> str:
    """One sentence of a frame: the slots filled, the verb in `form` ("3sg", "ing" or "ed")."""
    words = []
    for slot in template.split():
        if slot == "S":
            words.append(people.phrase(rng))
        elif slot == "T":
            words.append(things.phrase(rng))
        elif slot == "P":
            words.append(rng.choice(PREPOSITIONS))
        elif slot == "V":
            words.append(f"is {inflect(verb, 'ing')}" if form == "ing" else inflect(verb, form))
        else:
            words.append(slot)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def frame_sentences(
    synsets: list[Synset],
    root: str | Path,
    held_ids: set[str],
    per_verb: int = 2,
    min_tagged: int = 3,
    seed: int = 0,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Sentences from the verb frames, and paraphrase pairs (two lemmas of one verb synset).

    Args:
        synsets: every WordNet synset (`corpus.read_wordnet`).
        root: the unpacked packages (for WordNet's index files).
        held_ids: synsets that must lend no word.
        per_verb: sentences per (verb synset, lemma).
        min_tagged: nouns are the common senses of lemmas sense-tagged at least this often.
        seed: the random seed.

    Returns:
        (sentences, pairs): sentences in generation order; pairs as (sentence, paraphrase).
    """
    rng = random.Random(seed)
    by_id = {s.id: s for s in synsets}
    weights = common_senses(root, "noun", min_tagged)
    person_ids = _descendants(PERSON, by_id) - held_ids
    thing_ids = _descendants(PHYSICAL_ENTITY, by_id) - person_ids - held_ids
    people = _NounPool((by_id[i] for i in sorted(person_ids)), weights)
    things = _NounPool((by_id[i] for i in sorted(thing_ids)), weights)
    exceptions = set()
    with open(Path(root) / "usr/share/wordnet/verb.exc", encoding="utf-8") as f:
        for line in f:
            exceptions.add(line.split()[-1].replace("_", " "))
    sentences: list[str] = []
    pairs: list[tuple[str, str]] = []
    for s in synsets:
        if not s.id.startswith("verb:") or s.id in held_ids:
            continue
        templates = [FRAMES[f] for f in dict.fromkeys(s.frames) if f in FRAMES]
        lemmas = [lemma for lemma in s.lemmas if re.fullmatch(r"[a-z][a-z -]*", lemma)]
        if not templates or not lemmas:
            continue
        for lemma in lemmas:
            forms = ("3sg", "ing") if lemma.split()[0] in exceptions else ("3sg", "ing", "ed")
            for _ in range(per_verb):
                state = rng.getstate()
                template, form = rng.choice(templates), rng.choice(forms)
                sentences.append(_sentence(template, lemma, form, people, things, rng))
                others = [
                    o for o in lemmas if o != lemma and (form != "ed" or o.split()[0] not in exceptions)
                ]
                if others and lemma == lemmas[0]:
                    after = rng.getstate()
                    other = rng.choice(others)
                    rng.setstate(state)  # the same template, form and nouns with the other lemma
                    rng.choice(templates), rng.choice(forms)
                    pairs.append((sentences[-1], _sentence(template, other, form, people, things, rng)))
                    rng.setstate(after)
    return sentences, pairs
