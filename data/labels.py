"""ConvForever's 50 categories and the caption classifier that turns free-text captions into labels.

PD-Extended rows carry captions, not class labels, so every peer derives the label from the caption with
the same deterministic keyword rules; two peers reading the same row must agree on its class, or the
averaged model learns noise. Rows whose caption names no category are dropped (and counted), never
mapped to class 0.

How a caption is matched:
  * lower-cased, split into alphanumeric words ("Hot-Dog's" -> "hot dog s"), so keywords only ever match
    whole words: "catalog" is not a cat, "bread" is not "bre";
  * every keyword also matches its English plural (puppy/puppies, box/boxes, wolf/wolves, potato/potatoes)
    plus a short table of irregular ones (mouse/mice, goose/geese, fungus/fungi);
  * keywords may be phrases of up to ``_MAX_PHRASE_WORDS`` words.

Priority when several keywords match, applied in this order:
  1. a phrase beats any keyword it contains: "hot dog" is a dish, not a dog; "guinea pig" a rodent, not
     an ungulate; "computer mouse" electronics;
  2. a specific keyword beats a generic one: umbrella nouns (``_GENERIC``: "animal"-like words such as
     "mammal" and "bird", holders such as "bowl", "box", "vase", scenery such as "beach" or "rock") only
     decide when nothing more specific is named, so "a bowl of strawberries" is fruit and "a bird, a
     sparrow" a songbird;
  3. otherwise the keyword that appears first in the caption wins, because captions name their subject
     first ("a puppy on a bridge" is a dog, "a bridge over a river, a dog walking" a bridge).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

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

# Words that name the category themselves or a clear member of it. Ambiguous words are left out on purpose
# ("orange" is mostly a colour, "can" mostly a verb, "watch" and "fly" too), because a wrong label costs
# more than a dropped row.
_SPECIFIC: dict[str, str] = {
    "fish": "fish salmon trout tuna goldfish carp koi shark cod catfish eel stingray clownfish guppy piranha "
            "sardine anchovy herring mackerel halibut flounder swordfish barracuda minnow tilapia angelfish "
            "pufferfish seahorse dogfish|sea bass|sea horse|tiger shark",
    "reptile": "reptile lizard snake python cobra viper rattlesnake boa iguana gecko chameleon crocodile "
               "alligator turtle tortoise terrapin anaconda skink caiman|monitor lizard|komodo dragon",
    "amphibian": "amphibian frog toad salamander newt axolotl tadpole bullfrog caecilian|tree frog",
    "bird": "parrot macaw cockatoo parakeet budgie pigeon dove peacock flamingo penguin ostrich emu pelican "
            "stork heron seagull gull toucan hummingbird woodpecker kingfisher rooster hen chicken puffin",
    "mammal": "elephant bear wolf fox hedgehog raccoon badger otter skunk panda seal walrus armadillo sloth "
              "anteater weasel ferret mink hyena grizzly bat|sea lion|polar bear",
    "insect": "insect bug beetle ladybug ladybird butterfly moth bee bumblebee honeybee wasp hornet ant "
              "dragonfly mosquito grasshopper cricket cicada caterpillar firefly termite cockroach mantis "
              "flea aphid weevil housefly",
    "arachnid": "arachnid spider tarantula scorpion tick mite|black widow|daddy longlegs",
    "crustacean": "crustacean crab lobster shrimp prawn crayfish crawfish krill barnacle|hermit crab",
    "mollusk": "mollusk mollusc snail slug octopus squid clam oyster mussel scallop cuttlefish nautilus conch "
               "cockle abalone|sea slug",
    "fungus": "fungus mushroom toadstool mould mold puffball morel chanterelle shiitake|fly agaric",
    "flower": "flower blossom bloom rose tulip daisy sunflower lily orchid lotus lavender dandelion poppy "
              "peony carnation marigold hibiscus magnolia daffodil bouquet petal chrysanthemum hydrangea "
              "geranium jasmine camellia azalea|tiger lily",
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
                "milkshake smoothie whiskey whisky champagne milk cola",
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
           "ocelot bobcat|maine coon|house cat",
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
    "raptor": "raptor eagle hawk falcon owl vulture kestrel osprey buzzard condor|bird of prey",
    "waterfowl": "waterfowl duck duckling goose swan mallard gander cygnet merganser",
    "songbird": "songbird sparrow robin finch canary warbler thrush blackbird bluebird wren starling lark "
                "nightingale chickadee titmouse oriole crow raven magpie goldfinch|blue jay",
    "weapon": "weapon sword gun rifle pistol revolver shotgun dagger spear crossbow longbow cannon musket "
              "grenade missile sabre saber katana mace halberd armour armor|bow and arrow|battle axe",
    "tool": "tool hammer screwdriver wrench spanner pliers drill axe hatchet chisel shovel spade rake hoe "
            "trowel chainsaw handsaw toolbox crowbar scissors sledgehammer pickaxe wheelbarrow ladder|tape measure",
    "vehicle": "vehicle car truck bus van motorcycle motorbike bicycle bike scooter tractor train locomotive "
               "tram taxi jeep suv limousine ambulance minivan trailer forklift bulldozer excavator sedan "
               "automobile|fire truck|race car|golf cart|pickup truck",
    "watercraft": "watercraft boat ship sailboat yacht canoe kayak ferry submarine raft gondola catamaran "
                  "speedboat tugboat steamboat rowboat barge schooner dinghy trawler galleon|cruise ship",
    "aircraft": "aircraft airplane aeroplane plane jet airliner helicopter glider blimp airship seaplane "
                "biplane rocket|hot air balloon|space shuttle",
    "instrument": "instrument guitar piano violin cello viola drum flute trumpet saxophone clarinet trombone "
                  "tuba harp banjo ukulele accordion harmonica synthesizer xylophone mandolin oboe bagpipe "
                  "tambourine|bass guitar|double bass|french horn|pipe organ",
    "electronics": "electronics computer laptop phone smartphone cellphone telephone tablet television tv "
                   "monitor camera headphone earbuds loudspeaker radio keyboard printer router microwave "
                   "console joystick calculator smartwatch robot|computer mouse|remote control|"
                   "game controller|circuit board",
    "furniture": "furniture chair table desk sofa couch bed bench stool armchair cabinet dresser wardrobe "
                 "bookshelf bookcase shelf drawer nightstand ottoman recliner futon crib cupboard sideboard "
                 "lamp mattress",
    "apparel": "apparel clothing clothes shirt tshirt dress jacket coat sweater hoodie jeans trousers pants "
               "shorts skirt blouse suit vest uniform gown kimono sari robe pajamas pyjamas sock tuxedo "
               "cardigan overalls raincoat swimsuit bikini outfit|t shirt",
    "footwear": "footwear shoe boot sneaker sandal slipper loafer stiletto clog moccasin cleats espadrille"
                "|high heels|flip flop",
    "headwear": "headwear hat cap helmet beanie beret bonnet turban crown tiara fedora sombrero headband "
                "visor headscarf bandana hijab|cowboy hat|baseball cap|top hat",
    "accessory": "accessory handbag purse backpack wallet belt necklace bracelet earring jewelry jewellery "
                 "sunglasses eyeglasses wristwatch umbrella scarf glove mitten necktie brooch pendant"
                 "|bow tie|wedding ring",
    "building": "building house skyscraper church cathedral temple mosque castle palace barn cottage cabin "
                "apartment hut mansion villa shed garage warehouse school hospital factory stadium pagoda "
                "chapel igloo farmhouse hotel",
    "structure": "tower monument statue lighthouse windmill dam pier tunnel arch archway obelisk pyramid "
                 "ruins fountain pylon scaffolding column pillar|ferris wheel",
    "fence": "fence fencing railing palisade gate|barbed wire|stone wall|picket fence",
    "bridge": "bridge footbridge viaduct aqueduct overpass drawbridge",
    "container": "|shipping container",
    "kitchenware": "kitchenware cookware skillet wok kettle teapot saucepan spatula ladle whisk knife fork "
                   "spoon cutlery utensil colander grater toaster blender|frying pan|cutting board",
    "sports": "sport sports ball football soccer basketball baseball tennis golf volleyball rugby hockey "
              "skateboard surfboard ski snowboard racket racquet frisbee dumbbell barbell kettlebell puck "
              "trophy|baseball bat|cricket bat|cricket ball|golf club|boxing glove",
    "geology": "geology boulder pebble mineral crystal geode fossil volcano lava cave cliff sandstone granite "
               "quartz stalactite stalagmite amethyst obsidian gemstone|rock formation",
}

# Umbrella nouns: they name the category only when nothing more specific is in the caption (rule 2).
_GENERIC: dict[str, str] = {
    "bird": "bird",
    "mammal": "mammal",
    "dish": "dish meal food dinner lunch breakfast cuisine",
    "structure": "structure construction",
    "vessel": "vessel vase urn jar jug pitcher amphora flask decanter goblet chalice carafe bottle",
    "container": "container box crate basket bucket barrel bin chest carton sack bag parcel package "
                 "suitcase luggage",
    "kitchenware": "plate bowl cup mug tray platter teacup saucer pot pan",
    "geology": "rock stone",
    "landscape": "landscape scenery mountain valley beach desert forest woods field meadow lake river ocean "
                 "sea waterfall canyon hill hillside sunset sunrise coast coastline shore island glacier "
                 "prairie savanna jungle countryside horizon seascape grassland tundra swamp marsh dune vista "
                 "panorama",
}

_IRREGULAR_PLURALS: dict[str, str] = {
    "mouse": "mice", "dormouse": "dormice", "titmouse": "titmice", "goose": "geese", "ox": "oxen",
    "fungus": "fungi", "octopus": "octopi", "louse": "lice",
}

_MAX_PHRASE_WORDS = 4
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


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
    return forms


def _phrase_forms(phrase: str) -> set[str]:
    words = _words(phrase)
    return {phrase} | {" ".join(words[:-1] + [p]) for p in _plurals(words[-1])}


def _split_keywords(spec: str) -> list[str]:
    """'a b|c d|e' -> single words a, b and phrases 'c d', 'e': phrases follow the first '|'."""
    head, *phrases = spec.split("|")
    return [" ".join(_words(k)) for k in head.split() + phrases if _words(k)]


def _build_table() -> dict[str, tuple[int, bool]]:
    """Maps every keyword form to (category index, is_generic); refuses a keyword listed twice."""
    keywords: dict[str, tuple[int, bool]] = {}
    for generic, source in ((False, _SPECIFIC), (True, _GENERIC)):
        for category, spec in source.items():
            for keyword in _split_keywords(spec):
                if keyword in keywords:
                    other = CATEGORIES[keywords[keyword][0]]
                    raise ValueError(f"keyword {keyword!r} is listed for both {other!r} and {category!r}; "
                                     "keep it in one category")
                keywords[keyword] = (CATEGORY_INDEX[category], generic)
    # Plurals never override a keyword's own spelling ("bus" stays a vehicle whatever "bu" + "s" spells).
    table = dict(keywords)
    for keyword, hit in keywords.items():
        for form in sorted(_phrase_forms(keyword)):
            table.setdefault(form, hit)
    return table


_TABLE = _build_table()


def keywords_for(category: str) -> list[str]:
    """The base keywords (not plural forms) of one category, specific ones first; for tests and demos."""
    if category not in CATEGORY_INDEX:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return _split_keywords(_SPECIFIC.get(category, "")) + _split_keywords(_GENERIC.get(category, ""))


def _matches(words: list[str]) -> Iterable[tuple[int, int, int, bool]]:
    """Every (start, end, category, generic) keyword span in the word list."""
    for start in range(len(words)):
        for length in range(min(_MAX_PHRASE_WORDS, len(words) - start), 0, -1):
            hit = _TABLE.get(" ".join(words[start:start + length]))
            if hit is not None:
                yield start, start + length, hit[0], hit[1]


def classify_caption(caption: str | None) -> int | None:
    """The category index a caption names, or None when it names none (the caller drops such rows)."""
    if not caption:
        return None
    spans = list(_matches(_words(caption)))
    # Rule 1: drop spans strictly inside a longer matched phrase.
    kept = [s for s in spans
            if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0]) for o in spans)]
    if not kept:
        return None
    # Rules 2 and 3: specific before generic, then earliest position.
    start, _end, category, _generic = min(kept, key=lambda s: (s[3], s[0]))
    return category


def label_from_value(value: object) -> int | None:
    """An explicit ``label`` cell (class index, numeric string or category name) -> index, else None.

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
        return value if 0 <= value < NUM_CLASSES else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return label_from_value(int(text))
        return CATEGORY_INDEX.get(text)
    # numpy integers and other int-likes
    if hasattr(value, "__index__"):
        return label_from_value(int(value.__index__()))
    return None
