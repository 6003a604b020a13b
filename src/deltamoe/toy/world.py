"""The toy world: people, their facts, and every text the toy build writes about them.

All randomness comes from ``random.Random`` instances seeded with strings derived from the
world seed and a purpose (``"{seed}:pretrain"``), so each stream is reproducible on its own
and adding a stream never changes another one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from deltamoe.toy.languages import LANGUAGES, ORIGINAL, RELATIONS, Language, describe, make_languages, make_names

# Kinds of plain-text documents and their share of every corpus. "bio": statements and
# question-answer passages about one person of the world; "mixed": one fact each about several
# people; "rc": statements about people who are not in the world followed by questions about
# them (reading comprehension as plain text, so that question words of every language occur
# in the text that pre-training and continued pre-training see).
DOC_MIX = (("bio", 0.4), ("mixed", 0.2), ("rc", 0.4))


def rng_for(seed: int, purpose: str) -> random.Random:
    # str seeds are hashed with sha512 by random.seed: stable across runs and Python versions.
    return random.Random(f"deltamoe-toy:{seed}:{purpose}")


@dataclass
class World:
    """People, facts and languages of one seed.

    ``facts[(person, relation)]`` is a concept (the original language's word). The fact pairs
    are split: chat (post-training) data asks only about ``train_pairs``; the world-fact
    evaluation asks about ``eval_pairs``, facts the model saw only as plain text.
    """

    seed: int
    languages: dict[str, Language]
    people: list[str]
    facts: dict[tuple[str, str], str]
    train_pairs: list[tuple[str, str]]
    eval_pairs: list[tuple[str, str]]
    # People who are not in the world, for reading comprehension (training and evaluation
    # alike: what is held out is the context, whose values are drawn afresh each time).
    rc_names: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "original_language": ORIGINAL,
            "languages": {c: describe(lang) for c, lang in self.languages.items()},
            "relations": {r: list(v) for r, v in RELATIONS.items()},
            "people": self.people,
            "facts": {p: {r: self.facts[(p, r)] for r in RELATIONS} for p in self.people},
            "eval_pairs": [list(p) for p in self.eval_pairs],
            "rc_names": self.rc_names,
        }


def make_world(seed: int, n_people: int, eval_fraction: float, n_fresh_names: int) -> World:
    rng = rng_for(seed, "world")
    taken: set[str] = set()
    people = make_names(rng, n_people, taken)
    rc_names = make_names(rng, n_fresh_names, taken)
    languages = make_languages(rng, reserved=set(taken))
    facts = {(p, r): rng.choice(values) for p in people for r, values in RELATIONS.items()}
    pairs = sorted(facts)
    rng.shuffle(pairs)
    n_eval = round(len(pairs) * eval_fraction)
    return World(seed, languages, people, facts, sorted(pairs[n_eval:]), sorted(pairs[:n_eval]), rc_names)


class TextMaker:
    """Documents, chat conversations and evaluation items in one language."""

    def __init__(self, world: World, lang: str, rng: random.Random, rc_people: int = 2, rc_statements: int = 3):
        if not 1 <= rc_people <= rc_statements <= len(RELATIONS):
            raise ValueError("need 1 <= rc_people <= rc_statements <= number of relations")
        self.world = world
        self.lang: Language = world.languages[lang]
        self.rng = rng
        self.rc_people = rc_people
        self.rc_statements = rc_statements

    # -- building blocks ----------------------------------------------------------------
    def _statement(self, person: str, relation: str, concept: str) -> str:
        return self.lang.statement(person, relation, concept, self.rng.randrange(3))

    def _question(self, person: str, relation: str) -> str:
        return self.lang.question(person, relation, self.rng.randrange(2))

    def _qa(self, person: str, relation: str, concept: str) -> str:
        return self.lang.qa_passage(self._question(person, relation), self.lang.value(concept))

    def rc_context(self, names: list[str], n: int | None = None) -> tuple[list[str], list[tuple[str, str, str]]]:
        """Statements about people outside the world (so the answer must be read, not recalled):
        ``rc_statements`` facts with pairwise different relations, spread over ``rc_people``
        people, in random order. A question about one of them is answered by finding the
        statement of the asked relation; the others are distractors, so the question words
        must be understood. Returns (sentences, facts)."""
        n = n or self.rc_statements
        people = self.rng.sample(names, min(self.rc_people, n))
        relations = self.rng.sample(list(RELATIONS), n)
        owners = people + [self.rng.choice(people) for _ in range(len(relations) - len(people))]
        self.rng.shuffle(owners)
        facts = [(p, r, self.rng.choice(RELATIONS[r])) for p, r in zip(owners, relations, strict=True)]
        return [self._statement(p, r, v) for p, r, v in facts], facts

    # -- plain-text documents -----------------------------------------------------------
    def document(self, kind: str, names: list[str]) -> str:
        w = self.world
        if kind == "bio":
            person = self.rng.choice(w.people)
            relations = self.rng.sample(list(RELATIONS), self.rng.randint(2, len(RELATIONS)))
            sents = [self.lang.intro(person)] if self.rng.random() < 0.5 else []
            sents += [self._statement(person, r, w.facts[(person, r)]) for r in relations]
            if self.rng.random() < 0.3:
                sents.append(self.lang.friends(person, self.rng.choice(w.people)))
            for r in self.rng.sample(list(RELATIONS), self.rng.randint(1, 2)):
                sents.append(self._qa(person, r, w.facts[(person, r)]))
        elif kind == "mixed":
            sents = []
            for person in self.rng.sample(w.people, min(4, len(w.people))):
                r = self.rng.choice(list(RELATIONS))
                sents.append(self._statement(person, r, w.facts[(person, r)]))
            person = self.rng.choice(w.people)
            r = self.rng.choice(list(RELATIONS))
            sents.append(self._qa(person, r, w.facts[(person, r)]))
        elif kind == "rc":
            # Contexts of 1 .. rc_statements statements: with a single statement, copying the
            # one value in context is already right, which lets a tiny model discover copying
            # long before it could from full-size contexts alone (a curriculum inside the mix).
            sents, facts = self.rc_context(names, self.rng.randint(1, self.rc_statements))
            for p, r, v in self.rng.sample(facts, self.rng.randint(1, len(facts))):
                sents.append(self._qa(p, r, v))
        else:  # pragma: no cover - DOC_MIX is fixed
            raise ValueError(kind)
        return " ".join(sents)

    def document_random(self, names: list[str]) -> str:
        """A document of a kind drawn from :data:`DOC_MIX`."""
        kind = self.rng.choices([k for k, _ in DOC_MIX], [w for _, w in DOC_MIX])[0]
        return self.document(kind, names)

    def parallel_document(self, lang: str, names: list[str]) -> str:
        """One document in the original language followed by the same document (same people,
        facts, sentence choices) in ``lang``: the translations that real multilingual corpora
        hold a little of, and from which a model learns that words of two languages mean the
        same. Draws one number from this maker's generator."""
        sub = self.rng.getrandbits(64)
        first = TextMaker(self.world, ORIGINAL, random.Random(sub), self.rc_people, self.rc_statements)
        second = TextMaker(self.world, lang, random.Random(sub), self.rc_people, self.rc_statements)
        return f"{first.document_random(names)} {second.document_random(names)}"

    def documents(self, n: int, names: list[str]) -> list[str]:
        return [self.document_random(names) for _ in range(n)]

    # -- chat and evaluation ------------------------------------------------------------
    def rc_item(self, names: list[str]) -> dict[str, str]:
        """Reading comprehension: the user message holds a context and a question."""
        sents, facts = self.rc_context(names)
        p, r, v = self.rng.choice(facts)
        question = self._question(p, r)
        return {"task": "rc", "context": " ".join(sents), "question": question,
                "prompt": f"{' '.join(sents)}\n{question}", "answer": self.lang.value(v), "relation": r}

    def fact_item(self, person: str, relation: str) -> dict[str, str]:
        """A world fact: the user message is only the question."""
        question = self._question(person, relation)
        return {"task": "facts", "context": "", "question": question, "prompt": question,
                "answer": self.lang.value(self.world.facts[(person, relation)]), "person": person,
                "relation": relation}


    # -- multiple choice (scored by option log-likelihood, as lm-eval's multiple_choice) ---
    def _mc(self, prompt: str, answer: str, distractors: list[str], **extra: str) -> dict[str, Any]:
        concepts = [answer, *distractors]
        order = list(range(len(concepts)))
        self.rng.shuffle(order)
        return {"prompt": prompt, "options": [self.lang.value(concepts[i]) for i in order],
                "gold": order.index(0), **extra}

    def mc_rc_item(self, names: list[str], n_options: int = 4) -> dict[str, Any]:
        """Reading comprehension with options: a context of ``rc_statements`` facts (each of
        another relation) about people outside the world, a question about one of them, and as
        options the context's values (so copying any value from the context is not enough) plus
        other values of the asked relation (so knowing the relation's word class is not enough
        either). The prompt ends where the pre-training text's answers begin (``Q: .. A:``)."""
        sents, facts = self.rc_context(names)
        p, r, v = self.rng.choice(facts)
        others = [c for _, rel, c in facts if rel != r][: n_options - 2]
        same = self.rng.sample([c for c in RELATIONS[r] if c != v], n_options - 1 - len(others))
        prompt = f"{' '.join(sents)} Q: {self._question(p, r)} A:"
        return self._mc(prompt, v, [*others, *same], task="mc_rc", relation=r)

    def mc_fact_item(self, person: str, relation: str, n_options: int = 4) -> dict[str, Any]:
        """A world fact with options: the person's value and other values of the same relation."""
        v = self.world.facts[(person, relation)]
        wrong = self.rng.sample([c for c in RELATIONS[relation] if c != v], n_options - 1)
        return self._mc(f"Q: {self._question(person, relation)} A:", v, wrong, task="mc_facts",
                        person=person, relation=relation)


def chat_messages(item: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["answer"]}]


def languages() -> tuple[str, ...]:
    return LANGUAGES
