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
repairing the car."). The rich style adds adjectives, plural subjects ("Two men are ...", the verb
agreeing) and second clauses ("..., while ..."). `question_pairs` asks for a common noun or verb ("What is a
guitar?") and pairs the question with the definition: the register of search queries.

Held-out synsets (the retrieval evaluation) lend no word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # corpus.build imports this module
    from .corpus import Synset

__all__ = ["FRAMES", "common_senses", "frame_sentences", "inflect", "question_pairs"]

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


def _plural(noun: str, irregular: dict[str, str]) -> str:
    """The plural of a noun (its last word): WordNet's exception list (noun.exc), else the spelling rules."""
    *first, last = noun.split(" ")
    if last in irregular:
        last = irregular[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*first, last])


class _Pool:
    """Weighted sampling among the common senses of a set of synsets' lemmas."""

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

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cum)[0]


@dataclass
class _Words:
    """What the frames are filled with. `adjectives` and `plurals` are used by the rich style only."""

    people: _Pool
    things: _Pool
    irregular_verbs: set[str]  # verb.exc: no -ed form by rule
    adjectives: _Pool | None = None
    plurals: dict[str, str] = field(default_factory=dict)

    def forms(self, verb: str) -> tuple[str, ...]:
        """The forms of `verb` made by rule: irregular verbs get no -ed form."""
        return ("3sg", "ing") if verb.split()[0] in self.irregular_verbs else ("3sg", "ing", "ed")

    def phrase(self, pool: _Pool, rng: random.Random, rich: bool, plural: bool = False) -> str:
        """ "the man", "a guitar"; rich: sometimes an adjective, and "two men" when `plural`."""
        word = pool.draw(rng)
        if rich and rng.random() < 0.35:
            word = f"{self.adjectives.draw(rng)} {word}"
        if plural:
            quantity = rng.choice(("two", "three", "some", "the", "several", "many"))
            return f"{quantity} {_plural(word, self.plurals)}"
        det = rng.choice(("the", "a", "a", "his", "her", "their"))
        if det == "a" and word[0] in "aeiou":
            det = "an"
        return f"{det} {word}"


def _clause(template: str, verb: str, form: str, words: _Words, rng: random.Random, rich: bool) -> str:
    """One frame with its slots filled, the verb in `form` ("3sg", "ing" or "ed"), agreeing with a plural
    subject (rich style: 30 % of the subjects)."""
    plural = rich and rng.random() < 0.3
    out = []
    for i, slot in enumerate(template.split()):
        if slot in ("S", "T"):
            pool = words.people if slot == "S" else words.things
            out.append(words.phrase(pool, rng, rich, plural=plural and i == 0))
        elif slot == "P":
            out.append(rng.choice(PREPOSITIONS))
        elif slot == "V" and form == "ing":
            out.append(f"{'are' if plural else 'is'} {inflect(verb, 'ing')}")
        elif slot == "V":
            out.append(verb if plural and form == "3sg" else inflect(verb, form))
        else:
            out.append(slot)
    return " ".join(out)


@dataclass
class _Verb:
    lemmas: list[str]
    templates: list[str]


def _sentence(verb: str, template: str, form: str, words: _Words, verbs: list[_Verb], rng, rich: bool) -> str:
    """A frame sentence; rich style: 30 % get a second clause ("..., while two women are singing.")."""
    text = _clause(template, verb, form, words, rng, rich)
    if rich and rng.random() < 0.3:
        other = rng.choice(verbs)
        lemma = rng.choice(other.lemmas)
        second = _clause(rng.choice(other.templates), lemma, rng.choice(words.forms(lemma)), words, rng, rich)
        text += rng.choice((", while ", " and ", ", and then ", " because ")) + second
    return text[0].upper() + text[1:] + "."


def _read_exceptions(root: str | Path, pos: str) -> dict[str, str]:
    """WordNet's ``{pos}.exc`` (``inflected base...``): a line's last base form -> its inflected form."""
    out: dict[str, str] = {}
    with open(Path(root) / "usr/share/wordnet" / f"{pos}.exc", encoding="utf-8") as f:
        for line in f:
            words = line.split()
            out.setdefault(words[-1].replace("_", " "), words[0].replace("_", " "))
    return out


def frame_sentences(
    synsets: list[Synset],
    root: str | Path,
    held_ids: set[str],
    per_verb: int = 2,
    min_tagged: int = 3,
    seed: int = 0,
    rich: bool = False,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Sentences from the verb frames, and paraphrase pairs (two lemmas of one verb synset).

    Args:
        synsets: every WordNet synset (`corpus.read_wordnet`).
        root: the unpacked packages (for WordNet's index and exception files).
        held_ids: synsets that must lend no word.
        per_verb: sentences per (verb synset, lemma).
        min_tagged: nouns (and adjectives) are the common senses of lemmas sense-tagged at least this often.
        seed: the random seed.
        rich: also adjectives, plural subjects ("two men are ...") and two-clause sentences.

    Returns:
        (sentences, pairs): sentences in generation order; pairs as (sentence, paraphrase).
    """
    rng = random.Random(seed)
    by_id = {s.id: s for s in synsets}
    weights = common_senses(root, "noun", min_tagged)
    person_ids = _descendants(PERSON, by_id) - held_ids
    thing_ids = _descendants(PHYSICAL_ENTITY, by_id) - person_ids - held_ids
    words = _Words(
        _Pool((by_id[i] for i in sorted(person_ids)), weights),
        _Pool((by_id[i] for i in sorted(thing_ids)), weights),
        set(_read_exceptions(root, "verb")),
    )
    if rich:
        adj_weights = common_senses(root, "adj", min_tagged)
        words.adjectives = _Pool(
            (s for s in synsets if s.id.startswith("adj:") and s.id not in held_ids), adj_weights
        )
        words.plurals = _read_exceptions(root, "noun")
    verbs = []
    for s in synsets:
        if not s.id.startswith("verb:") or s.id in held_ids:
            continue
        templates = [FRAMES[f] for f in dict.fromkeys(s.frames) if f in FRAMES]
        lemmas = [lemma for lemma in s.lemmas if re.fullmatch(r"[a-z][a-z -]*", lemma)]
        if templates and lemmas:
            verbs.append(_Verb(lemmas, templates))
    sentences: list[str] = []
    pairs: list[tuple[str, str]] = []
    for verb in verbs:
        for lemma in verb.lemmas:
            forms = words.forms(lemma)
            for _ in range(per_verb):
                state = rng.getstate()
                template, form = rng.choice(verb.templates), rng.choice(forms)
                sentences.append(_sentence(lemma, template, form, words, verbs, rng, rich))
                others = [o for o in verb.lemmas if o != lemma and form in words.forms(o)]
                if others and lemma == verb.lemmas[0]:
                    after = rng.getstate()
                    other = rng.choice(others)
                    rng.setstate(state)  # the same template, form and nouns with the other lemma
                    rng.choice(verb.templates), rng.choice(forms)
                    pairs.append((sentences[-1], _sentence(other, template, form, words, verbs, rng, rich)))
                    rng.setstate(after)
    return sentences, pairs


def question_pairs(
    synsets: list[Synset], root: str | Path, held_ids: set[str], min_tagged: int = 1
) -> list[tuple[str, str]]:
    """("What is a guitar?", its definition) for the common senses of nouns, ("What does it mean to
    fix?", its definition) for verbs: the register of search queries, paired with the answer."""
    weights = {**common_senses(root, "noun", min_tagged), **common_senses(root, "verb", min_tagged)}
    pairs = []
    for s in synsets:
        pos = s.id.split(":")[0]
        if pos not in ("noun", "verb") or s.id in held_ids:
            continue
        for lemma in s.lemmas:
            if weights.get(f"{s.id} {lemma.lower()}") and re.fullmatch(r"[a-z][a-z -]*", lemma):
                if pos == "verb":
                    pairs.append((f"What does it mean to {lemma}?", s.definition))
                else:
                    pairs.append((f"What is {'an' if lemma[0] in 'aeiou' else 'a'} {lemma}?", s.definition))
                break
    return pairs
