"""ConvForever's 50 categories and the caption classifier that turns free-text captions into labels.

PD-Extended rows carry captions, not class labels, so every peer derives the label from the caption with
the same deterministic keyword rules; two peers reading the same row must agree on its class, or the
averaged model learns noise. Rows whose caption names no category are dropped (and counted), never
mapped to class 0. A wrong label costs more than a dropped row, so every rule below errs towards None.
bench/labeller_quality.py measures the rules on the hand-labelled captions in tests/data/.

How a caption is matched:
  * lower-cased, split into alphanumeric words ("Hot-Dog's" -> "hot dog s"), so keywords only ever match
    whole words: "catalog" is not a cat, "bread" is not "bre";
  * every keyword also matches its English plural (puppy/puppies, box/boxes, wolf/wolves, potato/potatoes,
    woman/women) plus a short table of irregular ones (mouse/mice, goose/geese, fungus/fungi);
  * keywords may be phrases of up to ``_MAX_PHRASE_WORDS`` words, matched only when no punctuation other
    than a hyphen or an apostrophe splits them;
  * besides the category keywords there are words that name no category but still tell what the caption is
    about: people and other subjects (``_SUBJECTS``: "portrait", "woman", "teddy bear", "tree"), documents
    and emblems (``_DOCUMENTS``: "map", "coin", "coat of arms") and fixed expressions (``_IDIOMS``:
    "fountain pen", "compass rose", "zebra crossing") that only stop the keywords inside them from counting;
  * a few words mean different things in different captions (``_SENSES``): "mouse" is electronics next to
    "keyboard", "seal" an animal only next to "harbor" or "flippers", a "plate" from a book no kitchenware.

Which keyword decides, applied in this order:
  1. a phrase beats any keyword it contains: "hot dog" is a dish, not a dog; "guinea pig" a rodent, not
     an ungulate; "computer mouse" electronics;
  2. in a compound the last noun is the head and the nouns before it only describe it: "apple pie" is a
     dessert, "barn owl" a raptor, "school bus" a vehicle, "a woman's hat" headwear; likewise a keyword
     directly followed by ``_MODIFIER_HEADS`` ("horse-drawn", "heart-shaped", "lime green") names nothing;
  3. after a document or emblem nothing counts ("a coin with an eagle" is no raptor), and after a person or
     another subject without a category the things it wears, holds, uses or stands in (``_INCIDENTAL``
     categories) do not count: "a portrait of a man in a dark suit" is no apparel, "a man riding a bicycle"
     is still a vehicle;
  4. buildings, structures, fences, bridges and furniture (``_SETTINGS``) decide only when the caption
     names them before anything else; named later they are where the subject is: "crates in a warehouse",
     "a field of wheat with a farmhouse in the distance", "a basket on a table";
  5. a specific keyword beats a generic one: umbrella nouns (``_GENERIC``: "animal"-like words such as
     "mammal" and "bird", holders such as "bowl", "box", "vase", scenery such as "beach" or "rock") only
     decide when nothing more specific is named, so "a bowl of strawberries" is fruit and "a bird, a
     sparrow" a songbird;
  6. otherwise the keyword that appears first in the caption wins, because captions name their subject
     first ("a puppy on a bridge" is a dog, "a bridge with a puppy" a bridge).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

CATEGORIES: tuple[str, ...] = (
    "fish", "reptile", "amphibian", "bird", "mammal", "insect", "arachnid", "crustacean", "mollusk",
    "fungus", "flower", "fruit", "vegetable", "dish", "beverage", "bread", "meat", "dessert", "dog", "cat",
    "primate", "marsupial", "cetacean", "ungulate", "rodent", "raptor", "waterfowl", "songbird", "weapon",
    "tool", "vehicle", "watercraft", "aircraft", "instrument", "electronics", "furniture", "apparel",
    "footwear", "headwear", "accessory", "building", "structure", "fence", "bridge", "vessel", "container",
    "kitchenware", "sports", "geology", "landscape",
)
NUM_CLASSES = len(CATEGORIES)
CATEGORY_INDEX: dict[str, int] = {name: i for i, name in enumerate(CATEGORIES)}

_MAX_PHRASE_WORDS = 4
_WORD = re.compile(r"[a-z0-9]+")
_TIGHT_GAP = re.compile(r"[\s'\u2019-]*")  # what may separate the words of a phrase or a compound


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# Words that name the category themselves or a clear member of it; phrases follow the first '|'. Ambiguous
# words are left out on purpose ("orange" is mostly a colour, "can" mostly a verb, "watch" and "fly" too,
# "mole" a spot on the skin as often as an animal), or listed in _SENSES to be decided by the caption.
_SPECIFIC: dict[str, str] = {
    "fish": "fish salmon trout tuna goldfish carp koi shark cod catfish eel stingray clownfish guppy piranha "
            "sardine anchovy herring mackerel halibut flounder swordfish barracuda minnow tilapia angelfish "
            "pufferfish seahorse dogfish sturgeon bream grouper snapper marlin lionfish sunfish haddock plaice "
            "|sea bass|sea horse|tiger shark|largemouth bass|smallmouth bass|striped bass",
    "reptile": "reptile lizard snake python cobra viper rattlesnake boa iguana gecko chameleon crocodile "
               "alligator turtle tortoise terrapin anaconda skink caiman|monitor lizard|komodo dragon",
    "amphibian": "amphibian frog toad salamander newt axolotl tadpole bullfrog caecilian|tree frog",
    "bird": "parrot macaw cockatoo parakeet budgie pigeon dove peacock flamingo penguin ostrich emu pelican "
            "stork heron seagull gull toucan hummingbird woodpecker kingfisher rooster hen chicken puffin "
            "crane egret ibis spoonbill cassowary quail pheasant partridge grouse peahen cockerel albatross "
            "cormorant dodo|bird of paradise",
    "mammal": "elephant bear wolf fox hedgehog raccoon badger otter skunk panda walrus armadillo sloth "
              "anteater weasel ferret mink hyena grizzly bat manatee dugong aardvark pangolin meerkat mongoose "
              "wolverine jackal coyote marten stoat shrew platypus echidna|sea lion|polar bear",
    "insect": "insect bug beetle ladybug ladybird butterfly moth bee bumblebee honeybee wasp hornet ant "
              "dragonfly mosquito grasshopper cricket cicada caterpillar firefly termite cockroach mantis "
              "flea aphid weevil housefly|crane fly",
    "arachnid": "arachnid spider tarantula scorpion tick mite|black widow|daddy longlegs",
    "crustacean": "crustacean crab lobster shrimp prawn crayfish crawfish krill barnacle|hermit crab",
    "mollusk": "mollusk mollusc snail slug octopus squid clam oyster mussel scallop cuttlefish nautilus conch "
               "cockle abalone cowrie whelk limpet|sea slug",
    "fungus": "fungus mushroom toadstool mould mold puffball morel chanterelle shiitake|fly agaric",
    "flower": "flower blossom bloom rose tulip daisy sunflower lily orchid lotus lavender dandelion poppy "
              "peony carnation marigold hibiscus magnolia daffodil bouquet petal chrysanthemum hydrangea "
              "geranium jasmine camellia azalea|tiger lily|flower bed|dog rose",
    "fruit": "fruit apple banana oranges tangerine mandarin clementine pear grape strawberry blueberry "
             "raspberry cherry watermelon melon mango pineapple kiwi lemon lime plum apricot papaya coconut "
             "pomegranate fig berry avocado grapefruit lychee cantaloupe nectarine blackberry cranberry",
    "vegetable": "vegetable veggie carrot broccoli cauliflower potato tomato onion garlic lettuce cabbage "
                 "spinach cucumber zucchini eggplant aubergine pumpkin squash corn pea bean radish beet "
                 "beetroot celery asparagus kale leek artichoke turnip yam|bell pepper|chili pepper|"
                 "sweet potato",
    "dish": "pasta spaghetti pizza burger hamburger sandwich salad soup stew curry sushi noodle ramen taco "
            "burrito lasagna risotto omelette omelet casserole fries dumpling paella|hot dog|fried rice|"
            "french fries",
    "beverage": "beverage drink coffee tea espresso cappuccino latte juice soda lemonade wine beer cocktail "
                "milkshake smoothie whiskey whisky champagne milk cola cocoa|hot chocolate",
    "bread": "bread loaf baguette bagel croissant bun toast pretzel sourdough ciabatta brioche focaccia pita "
             "flatbread naan",
    "meat": "meat steak beef pork bacon ham sausage salami pepperoni ribs meatball brisket jerky prosciutto "
            "veal mutton venison kebab|fried chicken|roast chicken|chicken wing|lamb chop|rack of lamb",
    "dessert": "dessert cake cupcake cookie pie tart gelato pudding brownie donut doughnut muffin cheesecake "
               "macaron chocolate candy sweets pastry waffle pancake sundae tiramisu custard eclair truffle"
               "|ice cream",
    "dog": "dog puppy pup doggy doggo hound terrier retriever labrador poodle beagle bulldog dachshund "
           "chihuahua husky corgi collie spaniel pug rottweiler dalmatian greyhound schnauzer pomeranian "
           "doberman mastiff pitbull|german shepherd|shih tzu|pit bull",
    "cat": "cat kitten kitty tabby feline lion lioness tiger leopard cheetah jaguar lynx cougar puma panther "
           "ocelot bobcat wildcat serval caracal|maine coon|house cat",
    "primate": "primate monkey ape gorilla chimpanzee chimp orangutan baboon lemur macaque gibbon bonobo "
               "mandrill marmoset capuchin tamarin",
    "marsupial": "marsupial kangaroo koala wallaby wombat opossum possum quokka bandicoot|tasmanian devil|"
                 "sugar glider",
    "cetacean": "cetacean whale dolphin porpoise orca narwhal beluga humpback",
    "ungulate": "ungulate horse pony foal stallion mare donkey mule zebra cow calf bull cattle ox bison "
                "buffalo yak deer fawn elk moose reindeer caribou antelope gazelle giraffe camel llama alpaca "
                "goat sheep lamb ram pig piglet hog boar rhino rhinoceros hippo hippopotamus tapir",
    "rodent": "rodent mouse rat hamster gerbil squirrel chipmunk beaver porcupine capybara marmot groundhog "
              "vole lemming dormouse chinchilla|guinea pig|prairie dog",
    "raptor": "raptor eagle hawk falcon owl vulture kestrel osprey buzzard condor goshawk sparrowhawk"
              "|bird of prey",
    "waterfowl": "waterfowl duck duckling goose swan mallard gander cygnet merganser eider wigeon pintail "
                 "shelduck",
    "songbird": "songbird sparrow robin finch canary warbler thrush blackbird bluebird wren starling lark "
                "nightingale chickadee titmouse oriole crow raven magpie goldfinch swallow nuthatch "
                "mockingbird|blue jay",
    "weapon": "weapon sword gun rifle pistol revolver shotgun dagger spear crossbow longbow cannon musket "
              "grenade missile sabre saber katana mace halberd armour armor arrowhead spearhead tomahawk "
              "bayonet blunderbuss scimitar rapier cutlass quiver|bow and arrow|battle axe|suit of armor|"
              "suit of armour|hunting bow|recurve bow|war club|throwing club",
    "tool": "tool hammer screwdriver wrench spanner pliers drill axe hatchet chisel shovel spade rake hoe "
            "trowel chainsaw handsaw toolbox crowbar scissors sledgehammer pickaxe wheelbarrow ladder sickle "
            "scythe mallet|tape measure|hand plane|block plane|jack plane",
    "vehicle": "vehicle car truck bus van motorcycle motorbike bicycle bike scooter tractor train locomotive "
               "tram taxi jeep suv limousine ambulance minivan trailer forklift bulldozer excavator sedan "
               "automobile carriage cart wagon stagecoach rickshaw streetcar lorry motorcar|fire truck|"
               "race car|golf cart|pickup truck|fire engine",
    "watercraft": "watercraft boat ship sailboat yacht canoe kayak ferry submarine raft gondola catamaran "
                  "speedboat tugboat steamboat rowboat barge schooner dinghy trawler galleon steamship "
                  "warship battleship frigate lifeboat houseboat riverboat longboat|cruise ship|ocean liner|"
                  "paddle steamer",
    "aircraft": "aircraft airplane aeroplane plane jet airliner helicopter glider blimp airship seaplane "
                "biplane rocket zeppelin dirigible warplane|hot air balloon|space shuttle",
    "instrument": "instrument guitar piano violin cello viola drum flute trumpet saxophone clarinet trombone "
                  "tuba harp banjo ukulele accordion harmonica synthesizer xylophone mandolin oboe bagpipe "
                  "tambourine|bass guitar|double bass|french horn|pipe organ",
    "electronics": "electronics computer laptop phone smartphone cellphone telephone tablet television tv "
                   "monitor camera headphone earbuds loudspeaker radio keyboard printer router microwave "
                   "console joystick calculator smartwatch robot|computer mouse|remote control|"
                   "game controller|circuit board",
    "furniture": "furniture chair table desk sofa couch bed bench stool armchair cabinet dresser wardrobe "
                 "bookshelf bookcase shelf nightstand ottoman recliner futon crib cupboard sideboard "
                 "lamp mattress|chest of drawers",
    "apparel": "apparel clothing clothes shirt tshirt dress jacket coat sweater hoodie jeans trousers pants "
               "shorts skirt blouse suit vest uniform gown kimono sari robe pajamas pyjamas sock tuxedo "
               "cardigan overalls raincoat swimsuit bikini outfit|t shirt",
    "footwear": "footwear shoe boot sneaker sandal slipper loafer stiletto clog moccasin cleats espadrille"
                "|high heels|flip flop",
    "headwear": "headwear hat cap helmet beanie beret bonnet turban crown tiara fedora sombrero headband "
                "visor headscarf bandana hijab|cowboy hat|baseball cap|top hat",
    "accessory": "accessory handbag purse backpack wallet belt necklace bracelet earring jewelry jewellery "
                 "sunglasses eyeglasses wristwatch umbrella scarf glove mitten necktie brooch pendant "
                 "spectacles parasol cufflink|bow tie|wedding ring|pocket watch|reading glasses|"
                 "pair of glasses",
    "building": "building house skyscraper church cathedral temple mosque castle palace barn cottage cabin "
                "apartment hut mansion villa shed garage warehouse school hospital factory stadium pagoda "
                "chapel igloo farmhouse hotel",
    "structure": "tower monument statue lighthouse windmill dam pier tunnel arch archway obelisk pyramid "
                 "ruins fountain pylon scaffolding column pillar|ferris wheel",
    "fence": "fence fencing railing palisade gate|barbed wire|stone wall|picket fence|chicken wire",
    "bridge": "bridge footbridge viaduct aqueduct overpass drawbridge",
    "container": "casket coffer hamper|shipping container",
    "kitchenware": "kitchenware cookware skillet wok kettle teapot saucepan spatula ladle whisk knife fork "
                   "spoon cutlery utensil colander grater toaster blender cauldron tureen chopsticks"
                   "|frying pan|cutting board|french press|coffee maker|coffee grinder|coffee pot|tea set|"
                   "tea service|dinner service|bone china|fine china|rolling pin|mortar and pestle",
    "sports": "sport sports ball football soccer basketball baseball tennis golf volleyball rugby hockey "
              "skateboard surfboard ski snowboard racket racquet frisbee dumbbell barbell kettlebell puck "
              "trophy athlete gymnast gymnastics skier skiing skateboarder snowboarder surfer surfing boxing "
              "wrestling wrestler|baseball bat|cricket bat|cricket ball|golf club|boxing glove|"
              "balance beam|boxing ring",
    "geology": "geology boulder pebble mineral crystal geode fossil volcano lava cave cliff sandstone granite "
               "quartz stalactite stalagmite amethyst obsidian gemstone limestone|rock formation",
}

# Umbrella nouns: they name the category only when nothing more specific is in the caption (rule 5).
_GENERIC: dict[str, str] = {
    "bird": "bird",
    "mammal": "mammal",
    "dish": "dish meal food dinner lunch breakfast cuisine",
    "structure": "structure construction",
    "vessel": "vessel vase urn jar jug pitcher amphora flask decanter goblet chalice carafe bottle",
    "container": "container box crate basket bucket barrel bin chest carton sack bag parcel package "
                 "suitcase luggage",
    "kitchenware": "plate bowl cup mug tray platter teacup saucer pot pan",
    "geology": "rock",  # not "stone": mostly a material ("stone bridge", "stone carving")
    "landscape": "landscape scenery mountain valley beach desert forest woods field meadow lake river ocean "
                 "sea waterfall canyon hill hillside sunset sunrise coast coastline shore island glacier "
                 "prairie savanna jungle countryside horizon seascape grassland tundra swamp marsh dune vista "
                 "panorama riverbank|river bed",
}

# Nouns that are what a caption is about but name no category (rule 3): people (portraits and group photos
# are a large share of PD-Extended) and other subjects without a category of their own.
_SUBJECTS = (
    "person people man woman boy girl child kid baby infant toddler lady gentleman family couple bride groom "
    "crowd audience portrait soldier sailor king queen prince princess emperor empress nobleman noblewoman "
    "knight saint madonna angel deity goddess buddha monk nun priest bishop pope student teacher nurse doctor "
    "worker farmer dancer ballerina actor actress merchant vendor pedestrian protester mother father son "
    "daughter brother sister grandmother grandfather wife husband "
    "page toy doll puppet dice chessboard snowman bonsai cactus fern seaweed jellyfish "
    "starfish urchin worm dinosaur clock machine|sea anemone|sea cucumber|self portrait|teddy bear|rocking horse|hobby horse|"
    "playing card|printing press|stuffed animal"
)

# Documents and emblems: whatever they show (an eagle on a coin, a lion on a coat of arms) is not the image's
# subject, so nothing after them counts (rule 3).
_DOCUMENTS = (
    "map chart diagram coin banknote stamp medal medallion emblem logo insignia flag manuscript newspaper "
    "ledger certificate calendar letter|coat of arms|title page|wax seal|seal of|official seal|great seal"
)

# Fixed expressions that name nothing: they only keep the keywords inside them from counting (rule 1).
_IDIOMS = (
    "|fountain pen|compass rose|zebra crossing|horse chestnut|table of|cabinet card|wine cellar|bed of|"
    "ice cap|crow s feet|dog eared|lion s share|bird s eye|bull s eye|school of|phone number|telephone number"
)

# Rule 3: what a person (or another subject without a category) wears, holds, uses or stands in.
_INCIDENTAL = frozenset({
    "apparel", "footwear", "headwear", "accessory", "furniture", "building", "structure", "fence", "bridge",
    "vessel", "container", "kitchenware", "weapon", "tool", "electronics", "flower", "fruit", "vegetable",
    "dish", "beverage", "bread", "meat", "dessert", "fungus", "geology", "landscape",
})
# Rule 4: the places and surfaces a subject is photographed in or on.
_SETTINGS = frozenset({"building", "structure", "fence", "bridge", "furniture"})

# Rule 2: a keyword directly followed by one of these describes the next noun ("horse-drawn carriage",
# "heart-shaped box", "lime green dress", "cherry wood cabinet").
_MODIFIER_HEADS = frozenset(_words(
    "drawn shaped pattern patterned patterns motif motifs skin wood colored coloured "
    "red pink yellow green blue purple violet brown white black grey gray gold golden silver"))

# A keyword in -ing followed by one of these is a verb: "a wasp building a nest", "a boy fencing the yard".
_DETERMINERS = frozenset(_words("a an the its their his her this that these those"))

# Words whose meaning depends on the rest of the caption, as "category: context words; ...": the first sense
# with one of its context words in the caption wins ("none" meaning the word is no subject at all). Without
# one, a word listed in _SPECIFIC or _GENERIC keeps that category and a word listed nowhere else names nothing.
_SENSES: dict[str, str] = {
    "mouse": "electronics: computer keyboard laptop wireless usb cursor mousepad scroll optical desk",
    "jaguar": "vehicle: car cars sedan coupe convertible roadster automobile vehicle racing engine driving parked",
    "bat": "sports: baseball cricket softball batter batsman wicket ball swing",
    "cricket": "sports: team match pitch bat bats ball wicket batsman bowler innings player players",
    "crane": "structure: construction site lifting cargo dock docks port jib boom girder unfinished scaffolding",
    "pitcher": "sports: baseball softball mound windup throw throws throwing batter catcher",
    "plate": "none: book textbook page illustration engraving lithograph etching fashion photographic negative "
             "atlas catalog",
    "kiwi": "bird: bird beak feathers flightless foraging nocturnal",
    "seal": "mammal: harbor harbour grey gray fur elephant monk leopard pup pups whiskers flippers colony basking",
    "bass": "fish: fish fishing largemouth smallmouth striped caught angler lure; "
            "instrument: guitar player playing music musician band strings amplifier jazz",
    "kite": "raptor: bird prey raptor feathers plumage talons beak forked wingspan perched",
    "trunk": "container: steamer travel luggage leather brass lid latches packed antique",
    "turkey": "bird: wild feathers plumage tail wattle gobbler farmyard flock; "
              "meat: roast roasted stuffed carved thanksgiving",
    "cardinal": "songbird: bird perched feathers beak feeder wings",
    "boxer": "dog: dog puppy breed brindle fawn leash collar kennel; "
             "sports: boxing ring gloves punch punches fight match bout",
    "fan": "electronics: electric blades blade motor ceiling desk oscillating grille; "
           "accessory: folding hand painted silk paper feather lace ivory",
    "orange": "fruit: sliced peeled peel segments juicy halved citrus zest",
}


def _parse_senses(spec: str) -> tuple[tuple[int | None, frozenset[str]], ...]:
    senses = []
    for part in spec.split(";"):
        name, _, context = part.partition(":")
        name = name.strip()
        if name != "none" and name not in CATEGORY_INDEX:
            raise ValueError(f"_SENSES names unknown category {name!r}")
        senses.append((None if name == "none" else CATEGORY_INDEX[name], frozenset(context.split())))
    return tuple(senses)


_SENSE_CONTEXT = {keyword: _parse_senses(spec) for keyword, spec in _SENSES.items()}

_IRREGULAR_PLURALS: dict[str, str] = {
    "mouse": "mice", "dormouse": "dormice", "titmouse": "titmice", "goose": "geese", "ox": "oxen",
    "fungus": "fungi", "octopus": "octopi", "louse": "lice", "child": "children", "person": "people",
}


def _tokens(text: str) -> tuple[list[str], list[bool]]:
    """The words, and for each whether it is joined to the previous one by nothing but spaces, hyphens or
    apostrophes (so "a dog, white" does not make a compound "dog white")."""
    text = text.lower()
    words, joined, end = [], [], None
    for match in _WORD.finditer(text):
        words.append(match.group())
        joined.append(end is not None and _TIGHT_GAP.fullmatch(text, end, match.start()) is not None)
        end = match.end()
    return words, joined


def _plurals(word: str) -> set[str]:
    """English plural forms of one word; over-generating is harmless, a missing plural drops real rows."""
    forms = {word + "s"}
    if word in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[word])
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(word + "es")
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        forms.add(word[:-1] + "ies")
    if word.endswith("f"):
        forms.add(word[:-1] + "ves")
    if word.endswith("fe"):
        forms.add(word[:-2] + "ves")
    if word.endswith("man"):
        forms.add(word[:-3] + "men")
    return forms


def _phrase_forms(phrase: str) -> set[str]:
    words = _words(phrase)
    return {phrase} | {" ".join(words[:-1] + [p]) for p in _plurals(words[-1])}


def _split_keywords(spec: str) -> list[str]:
    """'a b|c d|e' -> single words a, b and phrases 'c d', 'e': phrases follow the first '|'."""
    head, *phrases = spec.split("|")
    return [" ".join(_words(k)) for k in head.split() + phrases if _words(k)]


@dataclass(frozen=True)
class _Entry:
    """What one keyword form stands for."""

    keyword: str  # the listed spelling, which _SENSES is keyed by
    category: int | None  # None: a subject, document or idiom, which names no category
    generic: bool = False
    role: str = "category"  # category | subject | document | idiom | ambiguous (in _SENSES only)


def _build_table() -> dict[str, _Entry]:
    """Maps every keyword form to its _Entry; refuses a keyword listed twice."""
    entries: dict[str, _Entry] = {}

    def add(keyword: str, entry: _Entry, owner: str) -> None:
        if keyword in entries:
            raise ValueError(f"keyword {keyword!r} is listed twice ({owner} and another list); keep it in one")
        entries[keyword] = entry

    for generic, source in ((False, _SPECIFIC), (True, _GENERIC)):
        for category, spec in source.items():
            for keyword in _split_keywords(spec):
                add(keyword, _Entry(keyword, CATEGORY_INDEX[category], generic), category)
    for role, spec in (("subject", _SUBJECTS), ("document", _DOCUMENTS), ("idiom", _IDIOMS)):
        for keyword in _split_keywords(spec):
            add(keyword, _Entry(keyword, None, role=role), role)
    for keyword in _SENSES:
        entries.setdefault(keyword, _Entry(keyword, None, role="ambiguous"))
    # Plurals never override a keyword's own spelling ("bus" stays a vehicle whatever "bu" + "s" spells).
    table = dict(entries)
    for keyword, entry in entries.items():
        for form in sorted(_phrase_forms(keyword)):
            table.setdefault(form, entry)
    return table


_TABLE = _build_table()


def keywords_for(category: str) -> list[str]:
    """The base keywords (not plural forms) of one category, specific ones first; for tests and demos."""
    if category not in CATEGORY_INDEX:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return _split_keywords(_SPECIFIC.get(category, "")) + _split_keywords(_GENERIC.get(category, ""))


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    entry: _Entry
    category: int | None
    generic: bool

    @property
    def names_something(self) -> bool:
        """A category keyword, a subject or a document: not an idiom, nor an ambiguous word that named nothing."""
        return self.category is not None or self.entry.role in ("subject", "document")


def _spans(words: list[str], joined: list[bool]) -> list[_Span]:
    """Every keyword span, longest first at each start; a phrase never spans punctuation."""
    spans = []
    for start in range(len(words)):
        for length in range(min(_MAX_PHRASE_WORDS, len(words) - start), 0, -1):
            if not all(joined[start + 1:start + length]):
                continue
            entry = _TABLE.get(" ".join(words[start:start + length]))
            if entry is not None:
                spans.append(_Span(start, start + length, entry, entry.category, entry.generic))
    return spans


def _resolve_sense(span: _Span, context: set[str]) -> _Span:
    """An ambiguous word takes the first sense whose context words the caption holds (a specific keyword)."""
    for category, words in _SENSE_CONTEXT.get(span.entry.keyword, ()):
        if words & context:
            return _Span(span.start, span.end, span.entry, category, False)
    return span


def _is_verb(span: _Span, words: list[str]) -> bool:
    return words[span.end - 1].endswith("ing") and span.end < len(words) and words[span.end] in _DETERMINERS


def _is_modifier(span: _Span, words: list[str], joined: list[bool], starts: set[int]) -> bool:
    """Rule 2: followed directly by another keyword (also after a possessive "'s") or by a modifier head; a
    person or other subject in the possessive never is the subject ("a woman's straw hat", "a king's crown")."""
    after = span.end
    if after < len(words) and words[after] == "s" and joined[after]:
        if span.entry.role == "subject":
            return True
        after += 1
    if after >= len(words) or not joined[after]:
        return False
    return after in starts or (after == span.end and words[after] in _MODIFIER_HEADS)


def classify_caption(caption: str | None) -> int | None:
    """The category index a caption names, or None when it names none (the caller drops such rows)."""
    if not caption:
        return None
    words, joined = _tokens(caption)
    spans = _spans(words, joined)
    # Rule 1: drop spans strictly inside a longer matched phrase (idioms included, which is their purpose).
    spans = [s for s in spans
             if not any(o.start <= s.start and s.end <= o.end and (o.end - o.start) > (s.end - s.start)
                        for o in spans)]
    context = set(words)
    spans = [_resolve_sense(s, context - set(words[s.start:s.end])) for s in spans]
    spans = [s for s in spans if s.names_something and not _is_verb(s, words)]
    # Rule 2: in a compound only the last noun counts.
    starts = {s.start for s in spans}
    spans = [s for s in spans if not _is_modifier(s, words, joined, starts)]
    # Rule 3: documents end the caption; people and other subjects hide what they wear, hold and stand in.
    kept: list[_Span] = []
    subject_seen = False
    for span in sorted(spans, key=lambda s: s.start):
        if span.entry.role == "document":
            break
        if span.entry.role == "subject":
            subject_seen = True
        elif not (subject_seen and CATEGORIES[span.category] in _INCIDENTAL):
            kept.append(span)
    # Rule 4: settings decide only when named first (after a subject they are gone already, by rule 3).
    candidates = [s for i, s in enumerate(kept) if i == 0 or CATEGORIES[s.category] not in _SETTINGS]
    if not candidates:
        return None
    # Rules 5 and 6: specific before generic, then earliest position.
    return min(candidates, key=lambda s: (s.generic, s.start)).category


def label_from_value(value: object, num_classes: int = NUM_CLASSES) -> int | None:
    """An explicit ``label`` cell (class index below ``num_classes``, numeric string or category name) -> index,
    else None. ``num_classes`` exceeds the 50 categories for ImageNet-style data (``--num-classes 1000``).

    Returns None for anything it cannot map, which the loader counts as ``bad_label``; callers decide
    separately whether a cell is missing (null), in which case the caption decides instead.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        # Integer columns with nulls come back as floats from pandas-written files (3 -> 3.0).
        if math.isnan(value) or not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, int):
        return value if 0 <= value < num_classes else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return label_from_value(int(text), num_classes)
        return CATEGORY_INDEX.get(text)
    # numpy integers and other int-likes
    if hasattr(value, "__index__"):
        return label_from_value(int(value.__index__()), num_classes)
    return None
