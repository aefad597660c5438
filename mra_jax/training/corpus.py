"""A deterministic synthetic English-like corpus from a small probabilistic grammar (no downloads needed).

The grammar has structure an MLM can learn: subject-verb agreement (also across relative clauses and
``of`` modifiers), determiner/noun number agreement, a/an, adjectives, prepositional phrases, numbers and
dates, and six topic vocabularies. Each document keeps one topic, one protagonist and mostly one tense,
so documents are topically coherent. Sentences have 5-25 words, documents 3-12 sentences.
"""

from __future__ import annotations

import random

# Each topic: agents (animate subjects), things (objects), places, adjectives, transitive verbs
# (agent -> thing), intransitive verbs (thing subjects), named protagonists (name, pronoun).
# Nouns: "singular" or "singular/plural"; verbs: "base" or "base/past".
TOPICS: dict[str, dict[str, list]] = {
    "science": {
        "agents": ["researcher", "scientist", "student", "professor", "engineer", "team", "technician", "chemist",
                   "biologist", "physicist", "reviewer", "assistant"],
        "things": ["sample", "cell", "molecule", "signal", "particle", "protein", "experiment", "measurement",
                   "theory/theories", "model", "telescope", "star", "planet", "crystal", "gene", "enzyme",
                   "detector", "result", "hypothesis/hypotheses", "instrument"],
        "places": ["laboratory", "university", "observatory", "institute", "clean room", "field station"],
        "adjs": ["careful", "precise", "microscopic", "distant", "chemical", "genetic", "surprising", "stable",
                 "unstable", "faint", "bright", "complex", "simple", "accurate", "novel"],
        "tverbs": ["measure", "observe", "analyze", "test", "study", "detect", "publish", "describe", "confirm",
                   "predict", "isolate", "repeat", "record", "examine", "calibrate"],
        "iverbs": ["decay/decayed", "grow/grew", "change", "shine/shone", "fade", "vary/varied", "collapse",
                   "divide", "react", "appear"],
        "names": [("Dr. Chen", "she"), ("Professor Patel", "he"), ("Dr. Novak", "she"), ("Dr. Okafor", "he"),
                  ("Professor Lindqvist", "she")],
    },
    "sports": {
        "agents": ["player", "coach", "team", "goalkeeper", "striker", "referee", "captain", "runner", "fan",
                   "defender", "champion", "rookie"],
        "things": ["ball", "goal", "match/matches", "trophy/trophies", "medal", "race", "season", "game", "point",
                   "record", "final", "league", "penalty/penalties", "pass/passes", "title"],
        "places": ["stadium", "arena", "training ground", "locker room", "final round", "home field"],
        "adjs": ["fast", "strong", "young", "experienced", "tired", "brilliant", "narrow", "decisive", "loud",
                 "famous", "aggressive", "calm", "historic"],
        "tverbs": ["win/won", "lose/lost", "score", "kick", "defend", "miss", "block", "celebrate", "watch",
                   "chase", "break/broke", "save", "train", "lead/led", "host"],
        "iverbs": ["start", "end", "continue", "collapse", "improve", "rise/rose", "fall/fell", "last"],
        "names": [("Marco Silva", "he"), ("Aisha Bello", "she"), ("Tom Becker", "he"), ("Yuki Tanaka", "she"),
                  ("Carlos Ruiz", "he")],
    },
    "cooking": {
        "agents": ["chef", "cook", "baker", "waiter", "guest", "owner", "apprentice", "critic", "family",
                   "customer", "grandmother", "butcher"],
        "things": ["soup", "bread", "cake", "onion", "tomato/tomatoes", "recipe", "sauce", "knife/knives",
                   "dish/dishes", "oven", "salad", "potato/potatoes", "pie", "spice", "meal", "kitchen", "pan",
                   "cookie", "egg"],
        "places": ["kitchen", "bakery", "restaurant", "market", "garden", "dining room"],
        "adjs": ["hot", "fresh", "sweet", "salty", "spicy", "delicious", "crisp", "warm", "bitter", "simple",
                 "traditional", "homemade", "golden"],
        "tverbs": ["bake", "cook", "slice", "taste", "serve", "prepare", "stir/stirred", "season", "chop/chopped",
                   "boil", "roast", "mix", "buy/bought", "peel", "wash"],
        "iverbs": ["burn", "cool", "rise/rose", "melt", "boil", "simmer", "smell", "spoil"],
        "names": [("Chef Rossi", "he"), ("Maria Lopez", "she"), ("Anna Weber", "she"), ("Pierre Dubois", "he"),
                  ("Grace Kim", "she")],
    },
    "travel": {
        "agents": ["traveler", "tourist", "guide", "pilot", "driver", "passenger", "hiker", "sailor",
                   "photographer", "family", "conductor", "visitor"],
        "things": ["ticket", "train", "bus/buses", "plane", "map", "suitcase", "passport", "road", "bridge",
                   "village", "mountain", "river", "museum", "hotel", "ferry/ferries", "city/cities", "coast",
                   "border", "island", "trail"],
        "places": ["airport", "station", "harbor", "valley", "old town", "mountain pass", "city center"],
        "adjs": ["long", "quiet", "crowded", "ancient", "narrow", "beautiful", "remote", "cold", "sunny", "busy",
                 "famous", "small", "distant", "rainy"],
        "tverbs": ["visit", "cross", "book", "photograph", "explore", "reach", "leave/left", "find/found",
                   "follow", "climb", "board", "miss", "drive/drove", "see/saw", "pack"],
        "iverbs": ["arrive", "depart", "stop/stopped", "wait", "close", "open", "flood", "shine/shone"],
        "names": [("Lena Fischer", "she"), ("Omar Haddad", "he"), ("Sofia Marin", "she"), ("Jack Moore", "he"),
                  ("Priya Nair", "she")],
    },
    "finance": {
        "agents": ["investor", "banker", "analyst", "trader", "manager", "company/companies", "bank", "regulator",
                   "customer", "economist", "startup", "accountant"],
        "things": ["stock", "bond", "loan", "price", "market", "profit", "budget", "tax/taxes", "share", "fund",
                   "report", "contract", "account", "dividend", "currency/currencies", "rate", "deal", "invoice"],
        "places": ["bank", "stock exchange", "head office", "board meeting", "trading floor", "annual review"],
        "adjs": ["high", "low", "risky", "safe", "quarterly", "annual", "strong", "weak", "volatile", "cautious",
                 "profitable", "large", "modest"],
        "tverbs": ["buy/bought", "sell/sold", "raise", "cut/cut", "approve", "review", "invest", "borrow",
                   "lend/lent", "report", "audit", "forecast/forecast", "sign", "reject", "pay/paid"],
        "iverbs": ["rise/rose", "fall/fell", "recover", "grow/grew", "drop/dropped", "stabilize", "double",
                   "shrink/shrank"],
        "names": [("Ms. Walker", "she"), ("Mr. Hoffmann", "he"), ("Ms. Adeyemi", "she"), ("Mr. Sato", "he"),
                  ("Ms. Moreau", "she")],
    },
    "music": {
        "agents": ["singer", "pianist", "drummer", "band", "composer", "conductor", "orchestra", "violinist",
                   "producer", "audience", "choir", "guitarist"],
        "things": ["song", "album", "concert", "melody/melodies", "piano", "guitar", "symphony/symphonies", "chord",
                   "rhythm", "lyric", "record", "ticket", "tour", "note", "stage", "drum"],
        "places": ["concert hall", "studio", "festival", "theater", "club", "rehearsal room"],
        "adjs": ["loud", "soft", "slow", "catchy", "famous", "new", "classical", "electric", "beautiful",
                 "haunting", "popular", "live", "acoustic"],
        "tverbs": ["play", "sing/sang", "write/wrote", "record", "compose", "perform", "release", "tune", "hear/heard",
                   "rehearse", "love", "conduct", "mix", "practice", "announce"],
        "iverbs": ["begin/began", "end", "echo", "fade", "sell/sold", "play", "start", "sound"],
        "names": [("Nina Costa", "she"), ("Leo Brandt", "he"), ("Ella James", "she"), ("Samuel Green", "he"),
                  ("Mei Lin", "she")],
    },
}

ADVERBS = ["quickly", "carefully", "often", "rarely", "finally", "again", "suddenly", "slowly", "already", "usually"]
INTRO = ["However,", "Later,", "Meanwhile,", "As a result,", "In addition,", "Surprisingly,", "At first,",
         "Afterwards,", "Unfortunately,", "Fortunately,"]
PREPS = ["near", "behind", "inside", "outside", "beside", "at"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SAY_VERBS = ["say/said", "believe/believed", "report", "explain", "think/thought", "claim"]
SG_DETS = ["the", "the", "the", "a", "a", "this", "that", "every", "one"]
PL_DETS = ["the", "the", "the", "these", "those", "some", "many", "several", "few", "NUM"]


def _plural(noun: str) -> tuple[str, str]:
    if "/" in noun:
        sg, pl = noun.split("/")
        return sg, pl
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun, noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun, noun[:-1] + "ies"
    return noun, noun + "s"


def _verb(verb: str) -> tuple[str, str, str]:
    """(base, third person singular, past)."""
    base, past = verb.split("/") if "/" in verb else (verb, "")
    if base.endswith(("s", "sh", "ch", "x", "z", "o")):
        third = base + "es"
    elif base.endswith("y") and base[-2] not in "aeiou":
        third = base[:-1] + "ies"
    else:
        third = base + "s"
    if not past:
        if base.endswith("e"):
            past = base + "d"
        elif base.endswith("y") and base[-2] not in "aeiou":
            past = base[:-1] + "ied"
        else:
            past = base + "ed"
    return base, third, past


def _conj(verb: str, plural: bool, tense: str) -> str:
    base, third, past = _verb(verb)
    return past if tense == "past" else (base if plural else third)


def _be(plural: bool, tense: str) -> str:
    return ("were" if plural else "was") if tense == "past" else ("are" if plural else "is")


class _Doc:
    """Generator state of one document: topic, protagonist, tense and the random source."""

    def __init__(self, rng: random.Random, topic: str):
        self.rng = rng
        self.t = TOPICS[topic]
        self.name, self.pronoun = rng.choice(self.t["names"])
        self.tense = "past" if rng.random() < 0.6 else "present"

    def pick(self, seq):
        return self.rng.choice(seq)

    def tense_now(self) -> str:
        return self.tense if self.rng.random() < 0.85 else ("present" if self.tense == "past" else "past")

    def number(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return self.pick(NUMBER_WORDS)
        return str(self.rng.randint(13, 999) if r < 0.9 else self.rng.randint(1000, 20000))

    def date(self) -> list[str]:
        r = self.rng.random()
        year = str(self.rng.randint(1950, 2024))
        month = self.pick(MONTHS)
        if r < 0.35:
            return ["on", month, f"{self.rng.randint(1, 28)},", year]
        if r < 0.6:
            return ["in", month, year]
        if r < 0.8:
            return ["on", self.pick(DAYS)]
        return ["in", year]

    def noun_phrase(self, kind: str, plural: bool, adj_p: float = 0.4, modifier_p: float = 0.0) -> list[str]:
        sg, pl = _plural(self.pick(self.t[kind]))
        words = []
        while self.rng.random() < adj_p and len(words) < 2:
            adj = self.pick(self.t["adjs"])
            if adj not in words:
                words.append(adj)
        words.append(pl if plural else sg)
        det = self.pick(PL_DETS if plural else SG_DETS)
        if det == "NUM":
            det = self.number()
        elif det == "a" and words[0][0] in "aeiou":
            det = "an"
        out = [det, *words]
        if self.rng.random() < modifier_p:  # an "of" modifier between subject and verb: agreement is with the head
            out += ["of", *self.noun_phrase("things", self.rng.random() < 0.5, adj_p=0.2)]
        return out

    def place(self) -> list[str]:
        prep = "in" if self.rng.random() < 0.5 else self.pick(PREPS)
        return [prep, "the", self.pick(self.t["places"])]

    def subject(self) -> tuple[list[str], bool]:
        """An agent subject: the protagonist, its pronoun, or a noun phrase; and whether it is plural."""
        r = self.rng.random()
        if r < 0.25:
            return [self.name], False
        if r < 0.35:
            return [self.pronoun], False
        plural = self.rng.random() < 0.45
        return self.noun_phrase("agents", plural, modifier_p=0.15), plural

    def clause(self, depth: int = 0) -> list[str]:
        r = self.rng.random()
        tense = self.tense_now()
        if r < 0.35:  # agent verbs thing [place] [date]
            subj, plural = self.subject()
            words = [*subj]
            if self.rng.random() < 0.15:
                words.append(self.pick(ADVERBS))
            words += [_conj(self.pick(self.t["tverbs"]), plural, tense),
                      *self.noun_phrase("things", self.rng.random() < 0.4)]
            if self.rng.random() < 0.4:
                words += self.place()
            if self.rng.random() < 0.25:
                words += self.date()
            return words
        if r < 0.5:  # thing verbs [adverb] [place]
            plural = self.rng.random() < 0.45
            words = [*self.noun_phrase("things", plural, modifier_p=0.2),
                     _conj(self.pick(self.t["iverbs"]), plural, tense)]
            if self.rng.random() < 0.4:
                words.append(self.pick(ADVERBS))
            if self.rng.random() < 0.4:
                words += self.place()
            return words
        if r < 0.62:  # relative clause: the head noun, not the nearer one, agrees with the main verb
            plural = self.rng.random() < 0.5
            inner_plural = self.rng.random() < 0.5
            return [*self.noun_phrase("agents", plural, adj_p=0.2), "that",
                    _conj(self.pick(self.t["tverbs"]), plural, tense),
                    *self.noun_phrase("things", inner_plural, adj_p=0.2),
                    _conj(self.pick(self.t["tverbs"]), plural, tense),
                    *self.noun_phrase("things", self.rng.random() < 0.5, adj_p=0.2)]
        if r < 0.74:  # copula + adjective
            plural = self.rng.random() < 0.45
            kind = "things" if self.rng.random() < 0.7 else "agents"
            words = [*self.noun_phrase(kind, plural, adj_p=0.2, modifier_p=0.25), _be(plural, tense)]
            if self.rng.random() < 0.3:
                words.append(self.pick(["very", "quite", "not", "always"]))
            return [*words, self.pick(self.t["adjs"])]
        if r < 0.82:  # existential with a count
            count = self.number() if self.rng.random() < 0.85 else "one"
            plural = count != "one"
            sg, pl = _plural(self.pick(self.t["things"]))
            return ["there", _be(plural, tense), count, pl if plural else sg, *self.place()]
        if r < 0.9:  # date first
            subj, plural = self.subject()
            date = self.date()
            date[-1] += ","
            return [*date, *subj, _conj(self.pick(self.t["tverbs"]), plural, "past"),
                    *self.noun_phrase("things", True)]
        if r < 0.95 and depth == 0:  # reported speech
            subj, plural = self.subject()
            return [*subj, _conj(self.pick(SAY_VERBS), plural, tense), "that", *self.clause(depth + 1)]
        # "the number of X" agrees with "number"
        return ["the", "number", "of", _plural(self.pick(self.t["things"]))[1], _be(False, tense),
                self.number()]

    def sentence(self) -> str:
        for _ in range(100):
            words = self.clause()
            r = self.rng.random()
            if r < 0.15:
                words = [self.pick(INTRO), *words]
            elif r < 0.3:
                words = [*words[:-1], words[-1] + ",", self.pick(["and", "but", "because", "while"]),
                         *self.clause(1)]
            text = " ".join(words)  # items may hold several words ("Dr. Chen", "clean room")
            if 5 <= len(text.split()) <= 25 and text.count(",") <= 3:
                return text[0].upper() + text[1:] + "."
        raise RuntimeError("no sentence of 5-25 words")  # pragma: no cover


def generate(num_docs: int, seed: int = 0) -> list[str]:
    """``num_docs`` documents (3-12 sentences each), deterministic in ``seed``."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    docs = []
    for _ in range(num_docs):
        doc = _Doc(rng, rng.choice(topics))
        docs.append(" ".join(doc.sentence() for _ in range(rng.randint(3, 12))))
    return docs
