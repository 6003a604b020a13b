"""The toy world's languages: one original (English-like) language and three new ones.

Every language expresses the same meanings: "PERSON has VALUE for RELATION" as a statement,
a question about one relation of one person, and a question-answer passage. The new languages
differ from the original one in

- vocabulary: their words are generated from a per-language syllable inventory (seeded);
- word order: SOV (``vel``), VSO with fronted question words (``kyr``), OSV (``tol``);
- morphology: case suffixes (``vel``), case prefixes (``kyr``), vowel-harmony suffixes (``tol``);
  answers are always the uninflected citation form, so reading an answer off a sentence means
  undoing the morphology;
- script: ``kyr`` is written in Cyrillic.

Person names are shared by all languages (and stay in Latin script), as names are in real
multilingual text. They are the anchor that lets knowledge and the chat behaviour learned in
the original language carry over once a model has learned a new language's words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Relations of the world and the values each can take (concepts; the original language's
# words for them). Answers are single words so that exact match is a fair metric.
RELATIONS: dict[str, tuple[str, ...]] = {
    "job": ("baker", "farmer", "doctor", "teacher", "fisher", "singer", "painter", "hunter"),
    "pet": ("cat", "dog", "horse", "goat", "bird", "rabbit", "sheep", "duck"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "purple", "brown"),
    "food": ("bread", "rice", "cheese", "soup", "fish", "honey", "beans", "plums"),
    "home": ("village", "city", "forest", "desert", "valley", "harbor", "island", "meadow"),
}
ORIGINAL = "en"
NEW_LANGUAGES = ("vel", "kyr", "tol")
LANGUAGES = (ORIGINAL, *NEW_LANGUAGES)

# Function words every generated language needs (concept -> word).
_FUNCTION_WORDS = (
    "wh_thing", "wh_place", "cop", "gen", "about", "this", "story",
    "and", "friends", "q_particle", "every_day", "also",
)

_CYRILLIC = str.maketrans({
    "a": "а", "b": "б", "v": "в", "g": "г", "d": "д", "e": "е", "z": "з", "i": "и", "k": "к",
    "l": "л", "m": "м", "n": "н", "o": "о", "p": "п", "r": "р", "s": "с", "t": "т", "u": "у",
    "f": "ф", "h": "х", "c": "ц", "š": "ш", "y": "ы", "j": "й", "ž": "ж", "č": "ч",
})


@dataclass(frozen=True)
class Phonology:
    onsets: tuple[str, ...]
    vowels: tuple[str, ...]
    codas: tuple[str, ...]  # "" allowed: open syllables


_PHONOLOGY = {
    "vel": Phonology(("k", "l", "v", "r", "s", "t", "n", "m", "d", "z"), ("a", "e", "i", "o", "u", "ä"), ("", "", "r", "n")),
    "kyr": Phonology(("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "š", "v", "ž", "č"), ("a", "e", "i", "o", "u", "y"), ("", "", "", "k", "s")),
    "tol": Phonology(("t", "n", "p", "h", "w", "l", "k", "m"), ("a", "o", "u", "i"), ("", "", "", "n")),
}
_NAME_PHONOLOGY = Phonology(("b", "d", "f", "g", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v"), ("a", "e", "i", "o", "u"), ("", "", "", "n", "l"))


def _syllable(rng: random.Random, ph: Phonology) -> str:
    return rng.choice(ph.onsets) + rng.choice(ph.vowels) + rng.choice(ph.codas)


def _word(rng: random.Random, ph: Phonology, syllables: int) -> str:
    return "".join(_syllable(rng, ph) for _ in range(syllables))


def make_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` distinct capitalised person names that are not in ``taken`` (which is updated)."""
    out: list[str] = []
    while len(out) < n:
        name = _word(rng, _NAME_PHONOLOGY, rng.choice((2, 2, 3))).capitalize()
        if name.lower() not in taken:
            taken.add(name.lower())
            out.append(name)
    return out


@dataclass
class Language:
    """One language: its lexicon and how it realises statements, questions and passages."""

    code: str
    name: str
    script: str
    order: str  # word order of the verbal clause: S, V, O
    morphology: str
    words: dict[str, str]  # concept -> surface word (citation form)
    verbs: dict[str, str]  # relation -> verb
    nouns: dict[str, str]  # relation -> relational noun ("job", "pet", ...)
    affixes: dict[str, str] = field(default_factory=dict)  # relation (and "gen") -> affix

    def value(self, concept: str) -> str:
        return self.words[concept]

    # -- realisation -----------------------------------------------------------------------
    def statement(self, person: str, relation: str, concept: str, variant: int) -> str:
        """One sentence saying that ``person``'s ``relation`` is ``concept``."""
        if self.code == ORIGINAL:
            return _EN_STATEMENTS[relation][variant % len(_EN_STATEMENTS[relation])].format(
                P=person, V=self.words[concept]
            )
        return self._generated_statement(person, relation, self.words[concept], variant)

    def question(self, person: str, relation: str, variant: int) -> str:
        """A question asking for ``person``'s ``relation``."""
        if self.code == ORIGINAL:
            return _EN_QUESTIONS[relation][variant % len(_EN_QUESTIONS[relation])].format(P=person)
        return self._generated_question(person, relation, variant)

    def qa_passage(self, question: str, answer: str) -> str:
        """A question-answer passage in plain text (not chat); the answer is the citation form.

        The markers ``Q:`` and ``A:`` are the same in every language, as shared markup is in
        real multilingual text. They are the structural anchor that lets the chat behaviour
        learned in the original language (answer after ``<|assistant|>``, as after ``A:``)
        carry over to a new language once a model reads that language's questions.
        """
        return f"Q: {question} A: {answer}."

    def intro(self, person: str) -> str:
        if self.code == ORIGINAL:
            return f"This is a story about {person}."
        w = self.words
        parts = {"S": w["this"], "V": w["cop"], "O": f"{w['story']} {w['about']} {person}"}
        return _cap(" ".join(parts[c] for c in self.order)) + "."

    def friends(self, a: str, b: str) -> str:
        if self.code == ORIGINAL:
            return f"{a} and {b} are friends."
        w = self.words
        parts = {"S": f"{a} {w['and']} {b}", "V": w["cop"], "O": w["friends"]}
        return _cap(" ".join(parts[c] for c in self.order)) + "."

    # -- generated languages -------------------------------------------------------------
    def _inflect(self, word: str, slot: str) -> str:
        affix = self.affixes[slot]
        if self.morphology == "prefix":
            return affix + word
        if self.morphology == "harmony":  # suffix whose vowel copies the stem's last vowel
            last = next((c for c in reversed(word) if c in "aeiouy"), "a")
            return word + affix.replace("V", last)
        return word + affix

    def _genitive(self, person: str) -> str:
        if self.morphology == "prefix":  # a separate particle before the possessor
            return f"{self.words['gen']} {person}"
        return self._inflect(person, "gen")

    def _clause(self, s: str, v: str, o: str) -> str:
        parts = {"S": s, "V": v, "O": o}
        return " ".join(parts[c] for c in self.order)

    def _generated_statement(self, person: str, relation: str, value: str, variant: int) -> str:
        w = self.words
        if variant % 3 == 1:  # copular: "P's job is VALUE" -- the value in citation form
            subj = f"{self.nouns[relation]} {self._genitive(person)}" if self.morphology == "prefix" else (
                f"{self._genitive(person)} {self.nouns[relation]}"
            )
            text = self._clause(subj, w["cop"], value)
        else:
            text = self._clause(person, self.verbs[relation], self._inflect(value, relation))
            if variant % 3 == 2:
                text = f"{text} {w['every_day']}" if self.order[-1] != "S" else f"{w['every_day']} {text}"
        return _cap(text) + "."

    def _generated_question(self, person: str, relation: str, variant: int) -> str:
        w = self.words
        wh = w["wh_place"] if relation == "home" else w["wh_thing"]
        if variant % 2 == 1:
            subj = f"{self.nouns[relation]} {self._genitive(person)}" if self.morphology == "prefix" else (
                f"{self._genitive(person)} {self.nouns[relation]}"
            )
            s, v, o = subj, w["cop"], wh
        else:
            s, v, o = person, self.verbs[relation], self._inflect(wh, relation)
        if self.code == "kyr":  # question word fronted, the rest keeps VSO order
            text = f"{o} {self._clause(s, v, '').strip()}"
            text = " ".join(text.split())
        else:  # question word in situ
            text = self._clause(s, v, o)
        if self.code == "vel":
            text = f"{text} {w['q_particle']}"
        elif self.code == "tol":
            text = f"{w['q_particle']} {text}"
        return _cap(text) + "?"


def _cap(text: str) -> str:
    # The generated languages have no letter case (names keep theirs): one form per word.
    return text


_EN_STATEMENTS = {
    "job": ("{P} works as a {V}.", "The job of {P} is {V}.", "{P} is a {V} by trade."),
    "pet": ("{P} has a {V}.", "The pet of {P} is a {V}.", "{P} keeps a {V} at home."),
    "color": ("{P} likes the color {V}.", "The favorite color of {P} is {V}.", "{P} always wears {V}."),
    "food": ("{P} likes to eat {V}.", "The favorite food of {P} is {V}.", "{P} eats {V} every day."),
    "home": ("{P} lives in the {V}.", "The home of {P} is the {V}.", "{P} has a house in the {V}."),
}
_EN_QUESTIONS = {
    "job": ("What does {P} work as?", "What is the job of {P}?"),
    "pet": ("What pet does {P} have?", "What is the pet of {P}?"),
    "color": ("What color does {P} like?", "What is the favorite color of {P}?"),
    "food": ("What does {P} like to eat?", "What is the favorite food of {P}?"),
    "home": ("Where does {P} live?", "What is the home of {P}?"),
}
_EN_WORDS = {c: c for values in RELATIONS.values() for c in values}

_SPECS = {
    # code: (name, script, order, morphology)
    "vel": ("Velari", "latin", "SOV", "suffix"),
    "kyr": ("Kyrran", "cyrillic", "VSO", "prefix"),
    "tol": ("Tolani", "latin", "OSV", "harmony"),
}


def make_languages(rng: random.Random, reserved: set[str]) -> dict[str, Language]:
    """The original language and the generated new ones. ``reserved`` (lowercase words that
    must not be reused, e.g. names) is extended with every word created."""
    en = Language(
        code=ORIGINAL, name="English-like", script="latin", order="SVO", morphology="none",
        words=dict(_EN_WORDS), verbs={}, nouns={},
    )
    langs = {ORIGINAL: en}
    reserved |= {w.lower() for w in _EN_WORDS}
    for code in NEW_LANGUAGES:
        name, script, order, morphology = _SPECS[code]
        ph = _PHONOLOGY[code]
        used: set[str] = set()

        def fresh(syllables: int) -> str:
            while True:
                word = _word(rng, ph, syllables)
                if word not in used and word not in reserved:
                    used.add(word)
                    return word

        # Content words are two syllables; function words one (short and frequent, as in real
        # languages). Relational nouns and verbs are distinct per relation.
        words = {c: fresh(2) for values in RELATIONS.values() for c in values}
        # Harmony suffixes look at the last vowel, so stems must differ beyond their final
        # vowel or two values would inflect alike; fresh() already guarantees distinct words,
        # and the suffix only appends, so inflected forms stay distinct.
        for fw in _FUNCTION_WORDS:
            words[fw] = fresh(1 if fw not in ("story", "friends", "every_day") else 2)
        verbs = {r: fresh(2) for r in RELATIONS}
        nouns = {r: fresh(2) for r in RELATIONS}
        if morphology == "suffix":
            affixes = {r: rng.choice(ph.vowels) + rng.choice(("r", "n", "s", "t", "l")) + rng.choice(ph.vowels)
                       for r in RELATIONS}
            affixes["gen"] = "in"
        elif morphology == "prefix":
            affixes = {r: rng.choice(ph.onsets) + rng.choice(ph.vowels) for r in RELATIONS}
        else:
            affixes = {r: rng.choice(("k", "n", "m", "h", "w")) + "V" for r in RELATIONS}
            affixes["gen"] = "lV"
        _distinct_affixes(affixes, code)
        lang = Language(code=code, name=name, script=script, order=order, morphology=morphology,
                        words=words, verbs=verbs, nouns=nouns, affixes=affixes)
        if script == "cyrillic":
            _to_cyrillic(lang)
        reserved |= {w.lower() for w in [*lang.words.values(), *lang.verbs.values(), *lang.nouns.values()]}
        langs[code] = lang
    return langs


def _distinct_affixes(affixes: dict[str, str], code: str) -> None:
    """Make the relation affixes pairwise distinct (deterministically), so morphology tells
    relations apart the way cases do."""
    seen: set[str] = set()
    for r in RELATIONS:
        a = affixes[r]
        while a in seen:
            a = a + a[-1]
        affixes[r] = a
        seen.add(a)


def _to_cyrillic(lang: Language) -> None:
    lang.words = {k: v.translate(_CYRILLIC) for k, v in lang.words.items()}
    lang.verbs = {k: v.translate(_CYRILLIC) for k, v in lang.verbs.items()}
    lang.nouns = {k: v.translate(_CYRILLIC) for k, v in lang.nouns.items()}
    lang.affixes = {k: v.translate(_CYRILLIC) for k, v in lang.affixes.items()}


def describe(lang: Language) -> dict[str, object]:
    """JSON-ready description of a language (written to world.json)."""
    return {
        "code": lang.code, "name": lang.name, "script": lang.script, "order": lang.order,
        "morphology": lang.morphology, "words": lang.words, "verbs": lang.verbs, "nouns": lang.nouns,
        "affixes": lang.affixes,
    }
