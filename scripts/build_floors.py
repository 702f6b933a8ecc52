"""Build the shipped fictitious set: one invented subject per built-in fact, the floor's questions.

    python scripts/build_floors.py [--out PATH] [--seed N] [--facts PATH] [--tries N]

defaults: --out src/kuda_cli/data/builtin/fictitious.jsonl, --seed 0, --facts the built-in
facts, --tries 4000. Deterministic: one `random.Random(seed)` draws every name, facts in file order.

For every real fact it writes a fact of the same schema whose subject does not exist:
id "fict-" + the real id, the same domain, prompts, target and distractors (the same options, so
the model's option priors are the same), the real passage with the subject swapped for the
invented one, and "matches": the real id. The starting model's accuracy on these is the floor of
a model that knows none of the facts (as TOFU does with fictitious authors).

Invented subjects are pseudo-words from a syllable grammar: the real word's first 1-3 letters
(and a vowel if they end in a consonant), 0-2 consonant-vowel syllables, then an ending, 2-4
syllables in all. The ending has the domain's shape. Chemistry: lowercase, "-ium", "-on", "-ine",
"-gen", "-um" as the real element ends, else one of them. Countries (capitals, languages):
capitalised, "-ia", "-land", "-stan", "-ova", "-ador", ... (the real one's ending when it has one
of them, else drawn), a leading "the" and generic words such as Kingdom, Republic, States, North
kept ("the United Kingdom" -> "the Unikic Kingdom"). Landmarks: only the proper-name words
replaced, generic words such as Tower, Bridge, Palace, the, of kept ("the Eiffel Tower" -> "the
Eifavafel Tower"). People (occupations): the same, every name word replaced and particles such as
van, da kept ("Vincent van Gogh" -> "Vosalent van Goviseboh"). Half the tries draw the ending
freely. A pseudo-word is never a real subject, target, distractor, word of the facts file,
element, country, city or one of a list of common English words, has at least 5 letters and is
more than max(2, len/3) edits from every real subject word, element, country and city ("Rialo"
for "Rialto" is refused); no subject or pseudo-word is used twice.

Matched on readability: a candidate is accepted only when `surface_pick_share` (the letters-only
scorer of `kuda_cli.evaluate.floors`) of the invented subject over the options equals the real
subject's; after --tries candidates without one, the closest is taken and a warning names the
fact. At the end it prints, per domain, the count, the surface floor of the real and of the
fictitious facts side by side, and chance.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path

from kuda_cli.data.fact_set import Fact, builtin_facts_path, load_facts, parse_fact
from kuda_cli.evaluate.floors import chance, surface_floor, surface_letters, surface_pick_share

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "kuda_cli" / "data" / "builtin" / "fictitious.jsonl"

VOWELS = "aeiou"  # drawn
VOWELISH = "aeiouy"  # what counts as a vowel where letters meet
MIN_LETTERS = 5  # shorter pseudo-words too often are real words or names
CONSONANTS = "bdfgklmnprstvz"

CHEMISTRY_ENDINGS = ("ium", "gen", "ine", "on", "um")  # checked in this order ("ium" before "um")
# an ending the real country has is kept; otherwise (and for half the tries) one is drawn from
# COUNTRY_DRAWN
COUNTRY_KEPT = ("stan", "land", "ador", "ines", "ova", "ia", "ea", "ana", "ary", "ay", "al", "an")
COUNTRY_DRAWN = ("ia", "land", "stan", "ova", "ador", "ana", "ea", "ary", "ia", "an")
# before a generic word ("the Czech Republic" -> "the Dorvan Republic")
ADJECTIVE_ENDINGS = ("ian", "an", "ic", "ese", "ish")
COUNTRY_GENERIC = {"the", "of", "and", "kingdom", "republic", "states", "north", "south", "new"}
LANDMARK_GENERIC = {
    "the", "of", "tower", "bridge", "palace", "museum", "gate", "square", "building", "abbey",
    "basilica", "theatre", "memorial", "sign", "wall", "park", "gallery", "army", "parliament",
    "cathedral", "statue", "dome", "city", "house", "state",
}  # fmt: skip
NAME_PARTICLES = {"van", "von", "da", "de", "di", "du", "der", "del", "la", "le"}
GENERIC = COUNTRY_GENERIC | LANDMARK_GENERIC | NAME_PARTICLES
LANDMARK_ENDINGS = ("ian", "ia", "eum")  # kept whole when the real word ends so
CLUSTERS = {"rg", "ng", "nd", "st", "rt", "rk", "ll", "nn", "ss", "mp", "nt", "ck"}  # kept codas

ELEMENTS = """
hydrogen helium lithium beryllium boron carbon nitrogen oxygen fluorine neon sodium magnesium
aluminium aluminum silicon phosphorus sulfur sulphur chlorine argon potassium calcium scandium
titanium vanadium chromium manganese iron cobalt nickel copper zinc gallium germanium arsenic
selenium bromine krypton rubidium strontium yttrium zirconium niobium molybdenum technetium
ruthenium rhodium palladium silver cadmium indium tin antimony tellurium iodine xenon caesium
cesium barium lanthanum cerium praseodymium neodymium promethium samarium europium gadolinium
terbium dysprosium holmium erbium thulium ytterbium lutetium hafnium tantalum tungsten rhenium
osmium iridium platinum gold mercury thallium lead bismuth polonium astatine radon francium
radium actinium thorium protactinium uranium neptunium plutonium americium curium berkelium
californium einsteinium fermium mendelevium nobelium lawrencium rutherfordium dubnium seaborgium
bohrium hassium meitnerium darmstadtium roentgenium copernicium nihonium flerovium moscovium
livermorium tennessine oganesson
"""
COUNTRIES = """
afghanistan albania algeria andorra angola antigua argentina armenia australia austria azerbaijan
bahamas bahrain bangladesh barbados belarus belgium belize benin bhutan bolivia bosnia botswana
brazil brunei bulgaria burkina burundi cambodia cameroon canada chad chile china colombia comoros
congo croatia cuba cyprus czechia denmark djibouti dominica ecuador egypt eritrea estonia eswatini
ethiopia fiji finland france gabon gambia georgia germany ghana greece grenada guatemala guinea
guyana haiti honduras hungary iceland india indonesia iran iraq ireland israel italy jamaica japan
jordan kazakhstan kenya kiribati kosovo kuwait kyrgyzstan laos latvia lebanon lesotho liberia
libya liechtenstein lithuania luxembourg madagascar malawi malaysia maldives mali malta mauritania
mauritius mexico micronesia moldova monaco mongolia montenegro morocco mozambique myanmar namibia
nauru nepal netherlands nicaragua niger nigeria macedonia norway oman pakistan palau palestine
panama paraguay peru philippines poland portugal qatar romania russia rwanda samoa senegal serbia
seychelles singapore slovakia slovenia somalia spain sudan suriname sweden switzerland syria
taiwan tajikistan tanzania thailand togo tonga trinidad tobago tunisia turkey turkmenistan tuvalu
uganda ukraine uruguay uzbekistan vanuatu venezuela vietnam yemen zambia zimbabwe
prussia bohemia moravia bavaria persia siam burma zaire rhodesia ceylon yugoslavia tibet scotland
wales england britain greenland catalonia anatolia siberia transylvania asia europe africa
america oceania antarctica arabia scandinavia patagonia galicia cornwall lapland iberia dalmatia
ruritania narnia wakanda genovia latveria sokovia panem westeros freedonia elbonia florin zamunda
"""
CITIES = """
lima roma rome sofia manila havana kabul dakar lagos tokyo kyoto osaka milano napoli torino
malaga pisa verona geneva vienna riga minsk baku oslo bern quito bogota caracas managua nairobi
kampala kigali lusaka harare maputo luanda dodoma abuja accra lome bamako niamey tunis rabat
cairo tripoli doha muscat tehran beirut amman ankara tbilisi yerevan tashkent bishkek dushanbe
astana almaty kathmandu thimphu dhaka colombo hanoi vientiane bangkok yangon jakarta dili seoul
taipei canberra wellington suva apia honiara victoria moroni valletta nicosia athens tirana
skopje podgorica sarajevo zagreb ljubljana belgrade bucharest budapest bratislava prague warsaw
vilnius tallinn helsinki stockholm copenhagen reykjavik dublin london paris madrid lisbon
brussels amsterdam vaduz berlin chisinau kyiv kiev moscow ottawa washington kingston nassau
santiago montevideo brasilia sucre georgetown paramaribo cayenne toledo sevilla valencia
granada barcelona marseille toulouse lyon nice venice genoa palermo sparta troy odessa
"""
COMMON_WORDS = """
banana camera tomato potato volcano tornado piano radio video solo memo halo hero zero photo
lava soda coma data diva gala koala llama mama papa sofa tuna pasta salami sonata opera cobra
zebra panda lemon melon salon baton canon demon felon talon wagon robin cabin satin raven haven
seven token women linen lotus bonus focus virus minus genus venus menu tofu guru domino casino
bikini kimono origami karate karaoke avocado bolero fiesta siesta sierra fiasco gelato polo
bingo limbo mango tango rodeo patio radius medium podium museum stadium premium opium atrium
delirium aquarium geranium cranium gymnasium millennium condominium harmonium pandemonium
petunia begonia magnolia mania media militia regalia sequoia utopia nostalgia amnesia malaria
pneumonia anemia hernia dahlia tapioca vanilla gorilla paprika harmonica veranda agenda
cinema drama karma dilemma panorama lagoon balloon saloon typhoon gallon pelican toucan titan
woman human roman lumen golem totem harem denim venom ransom item idiom gallery nation lotion
potion motion ration region legion lesion union onion minion opinion million billion lion eon
aeon baron heron moron apron saga toga yoga vega mega omega beta delta gamma kappa sigma theta
zeta alpha lambda iota tile mole pole sole role hole dome home tome zone tone bone cone lone
done gone tune dune rune june mine fine line nine pine vine wine dine bovine canine feline
marine saline ravine routine famine genuine medicine sardine turbine vaccine nicotine machine
magazine gasoline ferine urine divine define refine combine decline engine margin origin
halogen collagen antigen allergen estrogen pathogen glycogen python photon proton electron
neutron boson muon pion gluon baryon meson lepton fermion colon semicolon bacon beacon deacon
falcon salmon sermon siphon summon button cotton mutton ribbon album asylum datum forum
momentum serum sedum minimum maximum odium rectum sanctum tedium vacuum quorum decorum
petroleum linoleum pendulum curriculum planetarium gum rum sum plum drum hum mum
malady melody remedy comedy tragedy canary salary rosary notary dietary military ordinary
january february primary library summary binary dictionary sanctuary mortuary
island holland lowland upland midland inland mainland homeland badland garland woodland
polka gorgon legend salad tulip topaz pagoda fedora veranda lasagna marimba samba rumba
mazurka bonanza armada cicada cornea retina saliva nova supernova aroma sauna tiara mimosa
manor minor major tenor motor rotor visor tutor donor valor vapor humor rumor tumor favor
ladder rider river silver finger number timber tiger paper water winter summer dinner
"""


def excluded_words(facts: list[Fact]) -> set[str]:
    """Words no pseudo-word may be: every word of the facts file and the lists above."""
    words = set((ELEMENTS + COUNTRIES + CITIES + COMMON_WORDS).split())
    for fact in facts:
        for text in (fact.subject, fact.target, *fact.distractors, *fact.prompts, fact.passage):
            words.update(
                w for w in (surface_letters(t) for t in re.split(r"[\s\-'.,]+", text)) if w
            )
    return words


def join(stem: str, ending: str, rng: random.Random) -> str:
    """stem + ending, with a consonant between two vowels and a vowel between two consonants."""
    if not stem or not ending:
        return stem + ending
    if stem[-1] in VOWELISH and ending[0] in VOWELISH:
        return stem + rng.choice(CONSONANTS) + ending
    if stem[-1] not in VOWELISH and ending[0] not in VOWELISH:
        return stem + rng.choice(VOWELS) + ending
    return stem + ending


def pseudo_word(real: str, ending: str, rng: random.Random) -> str:
    """Lowercase: an opening syllable (the real word's first 1-3 letters, and a vowel when they
    end in a consonant), 0-2 consonant-vowel syllables, then `ending` (2-4 syllables in all)."""
    letters = surface_letters(real) or rng.choice(CONSONANTS)
    stem = letters[: rng.randint(1, min(3, len(letters)))]
    if stem[-1] not in VOWELISH:
        stem += rng.choice(VOWELS)
    for _ in range(rng.randint(0, 2)):
        syllable = rng.choice(CONSONANTS) + rng.choice(VOWELS)
        while stem.endswith(syllable):  # no "fufu"
            syllable = rng.choice(CONSONANTS) + rng.choice(VOWELS)
        stem += syllable
    return join(stem, ending, rng)


def word_tail(word: str) -> str:
    """The end of a word, to keep its look: "-ian", "-ia", "-eum" whole, else its last vowel and
    the consonants after it when they are one or a common cluster, else the last consonant
    ("Eiffel" -> "el", "Brandenburg" -> "urg", "Lincoln" -> "on", "Louvre" -> "e")."""
    letters = surface_letters(word)
    for ending in LANDMARK_ENDINGS:
        if letters.endswith(ending):
            return ending
    found = re.search(r"([aeiouy])([^aeiouy]*)$", letters)  # the last vowel, what follows
    if not found:
        return ""
    vowel, coda = found.group(1, 2)
    if len(coda) > 1 and coda not in CLUSTERS:
        coda = coda[-1]
    return vowel + coda


def capitalised(word: str) -> str:
    return word[:1].upper() + word[1:]


def chemistry_subject(subject: str, rng: random.Random, free_ending: bool) -> list[str]:
    ending = next((e for e in CHEMISTRY_ENDINGS if subject.endswith(e)), None)
    if ending is None or free_ending:
        ending = rng.choice(CHEMISTRY_ENDINGS)
    return [pseudo_word(subject, ending, rng)]


def country_subject(subject: str, rng: random.Random, free_ending: bool) -> list[str]:
    words = subject.split()
    named = [i for i, w in enumerate(words) if w.lower() not in COUNTRY_GENERIC]
    out = list(words)
    for i in named:
        word = words[i]
        follows = words[i + 1].lower() if i + 1 < len(words) else None
        if follows in COUNTRY_GENERIC:  # an adjective: "the Czech Republic"
            kept = next((e for e in ADJECTIVE_ENDINGS if word.lower().endswith(e)), None)
            ending = rng.choice(ADJECTIVE_ENDINGS) if kept is None or free_ending else kept
        elif i == named[-1]:  # the country's own name
            kept = next((e for e in COUNTRY_KEPT if word.lower().endswith(e)), None)
            ending = rng.choice(COUNTRY_DRAWN) if kept is None or free_ending else kept
        else:  # a first word of two ("Costa Rica", "Saudi Arabia")
            ending = word_tail(word)
        out[i] = capitalised(pseudo_word(word, ending, rng))
    return out


def landmark_subject(subject: str, rng: random.Random, free_ending: bool) -> list[str]:
    return named_words_replaced(subject, rng, free_ending, LANDMARK_GENERIC)


def person_subject(subject: str, rng: random.Random, free_ending: bool) -> list[str]:
    return named_words_replaced(subject, rng, free_ending, NAME_PARTICLES)


def named_words_replaced(
    subject: str, rng: random.Random, free_ending: bool, generic: set[str]
) -> list[str]:
    """Each word of `subject` outside `generic` replaced by a capitalised pseudo-word ending as
    it does (`word_tail`), or, with `free_ending`, in a drawn ending."""
    words = subject.split()
    named = [i for i, w in enumerate(words) if w.lower() not in generic]
    if not named:  # all generic ("Tower Bridge"): the first word is the name
        named = [next(i for i, w in enumerate(words) if w.lower() not in ("the", "of"))]
    out = list(words)
    for i in named:
        parts = []
        for part in words[i].split("-"):
            lower = surface_letters(part)
            suffix = next(
                (g for g in sorted(generic) if len(g) > 3 and lower.endswith(g) and lower != g),
                "",
            )  # "Rijksmuseum" keeps its "museum"
            if suffix and len(lower) - len(suffix) >= 2:
                parts.append(capitalised(pseudo_word(lower[: -len(suffix)], "", rng) + suffix))
                continue
            ending = rng.choice(("an", "el", "or", "ia", "en")) if free_ending else word_tail(part)
            parts.append(capitalised(pseudo_word(part, ending, rng)))
        out[i] = "-".join(parts)
    return out


SHAPES = {
    "chemistry": chemistry_subject,
    "capitals": country_subject,
    "languages": country_subject,
    "landmarks": landmark_subject,
    "occupations": person_subject,
}


def replaced_words(real: str, invented: str) -> list[str]:
    """The pseudo-words of an invented subject: its words that differ from the real one's."""
    pairs = zip(real.split(), invented.split(), strict=True)
    return [p.lower() for r, i in pairs if r != i for p in i.split("-")]


def swap_subject(passage: str, real: str, invented: str) -> str:
    """The passage with the real subject (or it without its leading "the") swapped."""
    for old, new in ((real, invented), (real.removeprefix("the "), invented.removeprefix("the "))):
        pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)", re.IGNORECASE)
        if pattern.search(passage):
            return pattern.sub(
                lambda m, new=new: capitalised(new) if m[0][0].isupper() else new, passage
            )
    raise SystemExit(f"passage does not name its subject {real!r}: {passage!r}")


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def near_name(word: str, names: set[str]) -> bool:
    """Whether `word` is within max(2, len/3) edits of a real name ("Rialo" of "Rialto")."""
    for name in names:
        limit = max(2, len(name) // 3)
        if abs(len(name) - len(word)) <= limit and edit_distance(word, name) <= limit:
            return True
    return False


def real_names(facts: list[Fact]) -> set[str]:
    """Names an invented word must not be near: the real subjects' words, elements, countries,
    cities."""
    words = set((ELEMENTS + COUNTRIES + CITIES).split())
    for fact in facts:
        words.update(
            w for w in (surface_letters(t) for t in re.split(r"[\s\-]+", fact.subject)) if w
        )
    return words - GENERIC


def invent(
    fact: Fact,
    rng: random.Random,
    tries: int,
    banned_words: set[str],
    banned_subjects: set[str],
    names: set[str],
) -> tuple[str, bool]:
    """An invented subject for `fact` and whether its surface pick share equals the real one's."""
    shape = SHAPES.get(fact.domain, country_subject)
    want = surface_pick_share(fact.subject, fact.options)
    best, best_gap = None, math.inf
    for attempt in range(tries):
        words = shape(fact.subject, rng, free_ending=attempt >= tries // 2)
        subject = " ".join(words)
        if fact.domain == "chemistry":
            subject = subject.lower()
        pseudo = replaced_words(fact.subject, subject)
        kept = [w for w in subject.split() if w in fact.subject.split()]
        if (
            subject.lower() in banned_subjects
            or not pseudo
            or any(w.lower() not in GENERIC for w in kept)  # a name drawn as itself ("Arabia")
            or any(len(w) < MIN_LETTERS or w in banned_words for w in pseudo)
            or any(near_name(w, names) for w in pseudo)
        ):
            continue
        gap = abs(surface_pick_share(subject, fact.options) - want)
        if gap < 1e-12:
            return subject, True
        if gap < best_gap:
            best, best_gap = subject, gap
    if best is None:
        raise SystemExit(f"{fact.id}: no admissible invented subject in {tries} tries")
    return best, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", default=builtin_facts_path())
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tries", type=int, default=4000)
    args = parser.parse_args()

    facts = load_facts(args.facts)
    rng = random.Random(args.seed)
    banned_words = excluded_words(facts)
    names = real_names(facts)
    banned_subjects = {t.lower() for f in facts for t in (f.subject, *f.options)}
    records, fallbacks = [], 0
    for fact in facts:
        subject, matched = invent(fact, rng, args.tries, banned_words, banned_subjects, names)
        if not matched:
            fallbacks += 1
            print(
                f"warning: {fact.id} ({fact.subject}): no candidate matched surface pick share "
                f"{surface_pick_share(fact.subject, fact.options):.3f} in {args.tries} tries; "
                f"took {subject!r} ({surface_pick_share(subject, fact.options):.3f})"
            )
        banned_subjects.add(subject.lower())
        banned_words.update(replaced_words(fact.subject, subject))
        records.append(
            {
                "id": f"fict-{fact.id}",
                "domain": fact.domain,
                "subject": subject,
                "target": fact.target,
                "prompts": list(fact.prompts),
                "distractors": list(fact.distractors),
                "passage": swap_subject(fact.passage, fact.subject, subject),
                "matches": fact.id,
            }
        )

    out = Path(args.out)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fictitious = [parse_fact(r, str(out)) for r in records]

    real_by, fict_by = defaultdict(list), defaultdict(list)
    for fact in facts:
        real_by[fact.domain].append(fact)
    for fact in fictitious:
        fict_by[fact.domain].append(fact)
    print(f"wrote {len(records)} fictitious facts to {out} ({fallbacks} by the closest fallback)")
    print(f"{'domain':<12}{'count':>6}{'real floor':>12}{'fict floor':>12}{'chance':>8}")
    for domain in list(real_by) + ["all"]:
        real = facts if domain == "all" else real_by[domain]
        fict = fictitious if domain == "all" else fict_by[domain]
        print(
            f"{domain:<12}{len(real):>6}{surface_floor(real):>12.3f}"
            f"{surface_floor(fict):>12.3f}{chance(real):>8.3f}"
        )


if __name__ == "__main__":
    main()
