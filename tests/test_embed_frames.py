"""Verb-frame sentences from WordNet (rwkv_mm.embed.frames) on a tiny hand-written WordNet."""

from __future__ import annotations

import re

import pytest

from rwkv_mm.embed import corpus
from rwkv_mm.embed.frames import frame_sentences, inflect, question_pairs

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"
NOUNS = [  # physical_entity -> {person -> {man, woman}, guitar, car}
    "00001930 03 n 01 physical_entity 0 003 ~ 00007846 n 0000 ~ 03467517 n 0000 ~ 02958343 n 0000 "
    "| an entity  ",
    "00007846 03 n 02 person 0 somebody 0 002 ~ 10287213 n 0000 ~ 10787470 n 0000 | a human being  ",
    "10287213 18 n 01 man 0 001 @ 00007846 n 0000 | an adult male  ",
    "10787470 18 n 01 woman 0 001 @ 00007846 n 0000 | an adult female  ",
    "03467517 06 n 01 guitar 0 001 @ 00001930 n 0000 | a stringed instrument  ",
    "02958343 06 n 01 car 0 001 @ 00001930 n 0000 | a motor vehicle  ",
]
VERBS = [
    "01730060 36 v 01 play 0 000 02 + 08 00 + 02 00 | perform music on an instrument  ",
    "00260622 30 v 02 fix 0 repair 0 000 01 + 08 00 | restore by replacing a part  ",
    "01835496 38 v 01 run 0 000 01 + 02 00 | move fast by using one's feet  ",
]
INDEX_NOUN = [  # lemma pos synset_cnt p_cnt [ptrs] sense_cnt tagsense_cnt offsets
    "person n 1 1 ~ 1 20 00007846",
    "man n 1 1 @ 1 30 10287213",
    "woman n 1 1 @ 1 30 10787470",
    "guitar n 1 1 @ 1 5 03467517",
    "car n 1 1 @ 1 40 02958343",
    "physical_entity n 1 1 ~ 1 0 00001930",
]


@pytest.fixture
def wordnet(tmp_path):
    folder = tmp_path / "usr/share/wordnet"
    folder.mkdir(parents=True)
    (folder / "data.noun").write_text(HEADER + "".join(line + "\n" for line in NOUNS))
    (folder / "data.verb").write_text(HEADER + "".join(line + "\n" for line in VERBS))
    (folder / "data.adj").write_text(HEADER + "01644225 00 a 01 old 0 000 | having lived for a long time  \n")
    (folder / "data.adv").write_text(HEADER)
    (folder / "index.noun").write_text("".join(line + "\n" for line in INDEX_NOUN))
    (folder / "index.verb").write_text("fix v 1 1 @ 1 9 00260622\nplay v 1 1 @ 1 0 01730060\n")
    (folder / "index.adj").write_text("old a 1 0 1 12 01644225\n")
    (folder / "verb.exc").write_text("ran run\nrunning run\n")
    (folder / "noun.exc").write_text("men man\nwomen woman\n")
    return tmp_path


def test_pointers_and_frames_are_parsed(wordnet):
    synsets = {s.id: s for s in corpus.read_wordnet(wordnet)}
    assert synsets["noun:00007846"].pointers == [("~", "noun:10287213"), ("~", "noun:10787470")]
    assert synsets["verb:01730060"].frames == [8, 2]
    assert synsets["verb:00260622"].lemmas == ["fix", "repair"]


@pytest.mark.parametrize(
    "verb, forms",
    [
        ("play", ("plays", "playing", "played")),
        ("stop", ("stops", "stopping", "stopped")),
        ("tie", ("ties", "tying", "tied")),
        ("fix", ("fixes", "fixing", "fixed")),
        ("cry", ("cries", "crying", "cried")),
        ("hope", ("hopes", "hoping", "hoped")),
        ("agree", ("agrees", "agreeing", "agreed")),
        ("dress up", ("dresses up", "dressing up", "dressed up")),
    ],
)
def test_inflection(verb, forms):
    assert tuple(inflect(verb, f) for f in ("3sg", "ing", "ed")) == forms


def test_sentences_fill_the_frames_with_the_right_nouns(wordnet):
    synsets = corpus.read_wordnet(wordnet)
    sentences, pairs = frame_sentences(synsets, wordnet, held_ids=set(), per_verb=20, seed=1)
    assert len(sentences) == 20 * 4  # four verb lemmas
    det = r"(?:the|a|an|his|her|their)"
    person, thing = rf"{det} (?:man|woman|person|somebody)", rf"{det} (?:guitar|car)"
    for s in sentences:
        assert s[0].isupper() and s.endswith(".")
        body = s[0].lower() + s[1:-1]
        verb = (
            r"(?:plays|is playing|played|fixes|is fixing|fixed|repairs|is repairing|repaired|runs|is running)"
        )
        # frame 8 "Somebody ----s something" or frame 2 "Somebody ----s"; "run" is irregular: no -ed form
        assert re.fullmatch(rf"{person} {verb}(?: {thing})?", body), s
        assert "runned" not in s
    # the paraphrase pairs: one sentence per fix/repair sentence of the first lemma, the verb swapped
    assert len(pairs) == 20
    for a, b in pairs:
        assert re.search(r"\bfix", a) and re.search(r"\brepair", b)
        assert re.sub(r"\bfix(?:es|ing|ed)?\b", "V", a) == re.sub(r"\brepair(?:s|ing|ed)?\b", "V", b)


def test_held_out_synsets_lend_no_word(wordnet):
    synsets = corpus.read_wordnet(wordnet)
    held = {"noun:10787470", "verb:01835496"}  # woman, run
    sentences, _ = frame_sentences(synsets, wordnet, held_ids=held, per_verb=20, seed=2)
    assert sentences and not any("woman" in s or "run" in s for s in sentences)


def test_same_seed_same_sentences(wordnet):
    synsets = corpus.read_wordnet(wordnet)
    first = frame_sentences(synsets, wordnet, set(), seed=3)
    assert first == frame_sentences(synsets, wordnet, set(), seed=3)


def test_rich_style_adds_adjectives_plurals_and_second_clauses(wordnet):
    synsets = corpus.read_wordnet(wordnet)
    sentences, pairs = frame_sentences(synsets, wordnet, set(), per_verb=40, seed=4, rich=True)
    text = " ".join(sentences)
    assert " old " in text and re.search(r"\b(two|three|some|the|several|many) (men|women|persons)\b", text)
    assert any(re.search(r"(, while | and |, and then | because )", s) for s in sentences)
    for s in sentences:  # a plural subject agrees with its verb
        first = re.split(r"(, while | and |, and then | because )", s[0].lower() + s[1:-1])[0]
        m = re.match(r"(two|three|some|several|many) (old )?(men|women|persons) (\w+)", first)
        if m:
            assert m.group(4) in ("are", "play", "played", "fix", "fixed", "repair", "repaired", "run"), s
    assert "runned" not in text and len(pairs) == 40


def test_question_pairs_ask_for_the_definition(wordnet):
    synsets = corpus.read_wordnet(wordnet)
    pairs = dict(question_pairs(synsets, wordnet, held_ids={"noun:10787470"}))
    assert pairs["What is a man?"] == "an adult male"
    assert pairs["What is a car?"] == "a motor vehicle"
    assert pairs["What does it mean to fix?"] == "restore by replacing a part"
    assert "What is a woman?" not in pairs  # held out
    assert "What does it mean to play?" not in pairs  # never sense-tagged: not a common sense
