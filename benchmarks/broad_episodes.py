"""A broad set of personal facts for the learning benchmark, phrased as people write them.

Procedure: 64 kinds of personal fact (people, pets, places, possessions, preferences, health,
routines, work, dates, codes, nicknames, relations between them). Each kind has three statement
forms written by hand — a plain possessive or "I ..." sentence, one with another verb, and one
inside a longer chatty message — and two questions phrased unlike the statement (several do
not repeat its nouns: "What do I call my Volvo?" for a nickname). Values are made up (invented
words, codes and numbers) so the backbone cannot know them. A user's session teaches a few
kinds, sometimes two in one message.

Split by kind: `TUNING_KINDS` are the only ones any default, prompt, filter or threshold of the
learning code was chosen on or looked at; every other kind is held out (`HELD_OUT_KINDS`) and
reported separately. The question writer's worked examples (a sibling's job, a pet's name, where
a key is kept) are tuning kinds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from episodes import made_up_code, made_up_number, made_up_word

# kind: (value type, three statements with {v}, two questions)
KINDS: dict[str, tuple[str, tuple[str, str, str], tuple[str, str]]] = {
    # -- tuning kinds ---------------------------------------------------------------------------
    "sibling job": ("word", ("My sister works as a {v} in the city.", "My sister earns her living as a {v}.",
                    "Busy week! My sister just got promoted, she's a {v} now, can you believe it."),
                    ("What does my sister do for a living?", "What is my sister's profession?")),
    "rabbit": ("name", ("My rabbit is called {v}.", "We named our rabbit {v}.",
               "Cleaning the hutch again today, {v} my rabbit is such a messy eater."),
               ("What's the name of our rabbit?", "What did we call the rabbit?")),
    "spare key": ("word", ("The spare key is under the {v} pot.", "I keep the spare key beneath the {v} pot.",
                  "If I ever lock myself out, remember the spare key sits under the {v} pot."),
                  ("Where is my spare key?", "Where did I hide the extra house key?")),
    "car nickname": ("name", ("My car's nickname is {v}.", "I drive an old Volvo that I call {v}.",
                     "Took the Volvo to the garage, poor {v} needed new brakes."),
                     ("What do I call my Volvo?", "What nickname did I give my car?")),
    "allergy": ("word", ("I'm allergic to {v}.", "{v} makes me break out in hives.",
                "Dinner plans are tricky for me since I react badly to {v}."),
                ("What am I allergic to?", "Which thing should I stay away from?")),
    "locker": ("number", ("My locker code is {v}.", "I open my locker with the code {v}.",
               "Gym was packed today, and I nearly forgot my locker code, it's {v}."),
               ("What number opens my locker?", "Remind me of my locker combination.")),
    "dog": ("name", ("My dog's name is {v}.", "We got a puppy and named him {v}.",
            "Long walk this morning, {v} my dog chased every squirrel in the park."),
            ("What's my dog called?", "What name does my puppy have?")),
    "hometown": ("place", ("I grew up in {v}.", "My childhood was spent in {v}.",
                 "Funny, the rain reminds me of {v}, the town where I grew up."),
                 ("Where did I spend my childhood?", "Which town am I originally from?")),
    "employer": ("company", ("I work at {v}.", "{v} has employed me for six years.",
                 "Long day at the office, {v} keeps us busy before the holidays."),
                 ("Which company do I work for?", "Who is my employer?")),
    "favourite dish": ("word", ("My favourite dish is {v}.", "Nothing beats a plate of {v} for me.",
                       "Cooking tonight, making {v} again because it's my absolute favourite."),
                       ("What do I love to eat most?", "Which meal is my favourite?")),
    "band": ("name", ("I play bass in a band called {v}.", "Our band {v} rehearses on Thursdays.",
             "Gig on Friday! The band, {v}, finally booked a proper venue."),
             ("What is my band called?", "What's the name of the group I play in?")),
    "teacher": ("name", ("My piano teacher is Mrs. {v}.", "Mrs. {v} teaches me piano.",
                "Piano lesson went well, Mrs. {v} says I'm improving."),
                ("Who teaches me piano?", "What is my piano teacher's name?")),
    "wifi": ("code", ("Our wifi password is {v}.", "You can join our network with {v}.",
             "Guests keep asking, so for the record the wifi password at home is {v}."),
             ("What's the password for our wifi?", "How do guests get onto our network?")),
    "street": ("place", ("I live on {v} Street.", "Our flat is on {v} Street.",
               "The traffic on {v} Street where we live is getting worse."),
               ("What street do I live on?", "Which road is our flat on?")),
    "boss": ("name", ("My boss is called {v}.", "{v} manages our team at work.",
             "Annoying meeting today, {v}, my boss, moved every deadline up."),
             ("Who is my manager?", "What's my boss's name?")),
    "gym": ("company", ("I go to a gym called {v}.", "I train at {v} three times a week.",
            "Sore legs today, {v} gym had a brutal leg day class."),
            ("Where do I work out?", "What's my gym called?")),
    # -- held-out kinds -------------------------------------------------------------------------
    "daughter instrument": ("word", ("My daughter plays the {v}.", "My daughter practises the {v} every evening.",
                            "The house is noisy, my daughter has taken up the {v} and loves it."),
                            ("Which instrument does my daughter play?", "What does my girl practise at night?")),
    "landlord": ("name", ("My landlord is called Mr. {v}.", "Mr. {v} owns the flat I rent.",
                 "The boiler broke again and Mr. {v}, our landlord, still hasn't called back."),
                 ("Who owns the flat I rent?", "What's my landlord's name?")),
    "birthplace": ("place", ("I was born in the village of {v}.", "{v} is where I was born.",
                   "My passport says I was born in {v}, a tiny village up north."),
                   ("Where was I born?", "Which village am I from originally?")),
    "night job": ("place", ("I work night shifts at the {v} harbour.", "Every night I unload ships at {v} harbour.",
                  "So tired, another night shift down at the {v} harbour."),
                  ("Where do I work at night?", "Which harbour do I work at?")),
    "cat": ("name", ("My cat is named {v}.", "I adopted a cat and called her {v}.",
            "Honestly the weather has been awful, and my cat {v} refuses to go outside."),
            ("What's my cat called?", "What name did I give my cat?")),
    "boat": ("name", ("My boat is called {v}.", "I sail a little boat named {v}.",
             "Went sailing at dawn, {v} handled the wind beautifully."),
             ("What's the name of my boat?", "What did I name the boat I sail?")),
    "grandmother": ("name", ("My grandmother's name is {v}.", "Grandma {v} turns ninety next year.",
                    "Visited my grandmother {v} yesterday, she still bakes every day."),
                    ("What is my grandma called?", "Who is my grandmother?")),
    "best friend": ("name", ("My best friend is {v}.", "{v} and I have been best friends since school.",
                    "Movie night with {v}, my best friend, was exactly what I needed."),
                    ("Who is my closest friend?", "What's my best friend's name?")),
    "team codename": ("name", ("Our team's codename is {v}.", "At work our project team goes by {v}.",
                      "Big launch coming, the {v} team, that's us, is working late."),
                      ("What's our team's codename?", "What do we call our project team?")),
    "bike": ("name", ("I call my bicycle {v}.", "My bike has a name: {v}.",
             "Rode to work today, {v} my trusty bicycle got a flat on the way."),
             ("What's my bicycle called?", "What name does my bike have?")),
    "horse": ("name", ("My horse is called {v}.", "I ride a horse named {v} on weekends.",
              "Mucked out the stable, {v} my horse was in a grumpy mood."),
              ("What's my horse's name?", "Which horse do I ride on weekends?")),
    "nephew": ("name", ("My nephew's name is {v}.", "My brother's son is called {v}.",
               "Birthday party on Sunday, my nephew {v} turns seven."),
               ("What's my nephew called?", "What is my brother's boy named?")),
    "dentist": ("name", ("My dentist is Dr. {v}.", "Dr. {v} looks after my teeth.",
                "Ugh, check-up tomorrow with Dr. {v}, my dentist."),
                ("Who is my dentist?", "Which doctor looks after my teeth?")),
    "pharmacy": ("company", ("I get my prescriptions from {v} pharmacy.", "{v} pharmacy fills my prescriptions.",
                 "Picked up my pills at {v} pharmacy, the queue was endless."),
                 ("Where do I get my prescriptions?", "Which pharmacy do I use?")),
    "medication": ("word", ("I take {v} every morning.", "Every morning I swallow a {v} tablet.",
                   "Remind me to refill the {v}, I take it each morning with breakfast."),
                   ("What medicine do I take daily?", "Which tablet do I take in the morning?")),
    "blood type": ("code", ("My blood type is {v}.", "The hospital lists my blood group as {v}.",
                   "Donated blood today, they said my blood type {v} is always needed."),
                   ("What is my blood group?", "Which blood type do I have?")),
    "bank pin": ("number", ("My card PIN is {v}.", "I unlock my bank card with {v}.",
                 "Almost got locked out at the ATM, my PIN is {v}, I must stop mixing it up."),
                 ("What's the PIN of my bank card?", "Which number unlocks my card?")),
    "door code": ("number", ("The code for our building door is {v}.", "Our front door opens with {v}.",
                  "Delivery driver called, I told him the building code is {v}."),
                  ("How do I get into our building?", "What is the door code?")),
    "parking": ("code", ("My parking spot is {v}.", "I park in space {v} at work.",
                "Someone took my spot again, {v}, in the office garage."),
                ("Where do I park at work?", "Which parking space is mine?")),
    "flight": ("code", ("My flight number is {v}.", "I'm flying out on {v} next week.",
               "Packing already, flight {v} leaves at dawn on Monday."),
               ("What flight am I taking?", "Which flight number am I on?")),
    "anniversary": ("date", ("Our wedding anniversary is on {v}.", "We got married on {v}.",
                    "Must book a restaurant, our anniversary, {v}, is coming up."),
                    ("When is our anniversary?", "On what date did we get married?")),
    "birthday": ("date", ("My birthday is on {v}.", "I was born on {v}.",
                 "Planning a party because my birthday falls on {v} this year."),
                 ("When is my birthday?", "What day was I born on?")),
    "favourite colour": ("word", ("My favourite colour is {v}.", "I paint everything {v}, it's my colour.",
                         "Bought new curtains in {v}, my favourite colour of all."),
                         ("What colour do I like best?", "Which colour is my favourite?")),
    "favourite book": ("name", ("My favourite book is {v}.", "I have reread {v} a dozen times.",
                       "Rainy Sunday, curled up with {v} again, my favourite book."),
                       ("Which book do I love most?", "What novel do I keep rereading?")),
    "favourite drink": ("word", ("My favourite drink is {v}.", "I always order a {v} at the bar.",
                        "Long day, I could really use a glass of {v}, my go-to drink."),
                        ("What do I like to drink?", "What do I usually order at the bar?")),
    "hobby": ("word", ("My hobby is {v}.", "On weekends I do {v}.",
              "Spent the whole Saturday on {v} again, it's my favourite pastime."),
              ("What do I do for fun?", "What pastime do I enjoy on weekends?")),
    "sport team": ("company", ("I support {v} football club.", "{v} is the team I cheer for.",
                   "What a match! {v} won again, my team is on fire."),
                   ("Which football club do I support?", "What team do I cheer for?")),
    "neighbour": ("name", ("My neighbour is called {v}.", "{v} lives next door to me.",
                  "The dog next door barked all night, I need to talk to {v}, my neighbour."),
                  ("Who lives next door to me?", "What's my neighbour's name?")),
    "partner": ("name", ("My partner's name is {v}.", "I've been with {v} for ten years.",
                "Date night tonight, {v} and I are trying the new place downtown."),
                ("Who is my partner?", "What's the name of the person I'm with?")),
    "son school": ("company", ("My son goes to {v} school.", "{v} school is where my son studies.",
                   "Parents' evening at {v} school tonight, my son is nervous."),
                   ("Which school does my son attend?", "Where does my boy study?")),
    "university": ("company", ("I studied at {v} university.", "{v} university gave me my degree.",
                   "Found my old photos from {v} university, what a time that was."),
                   ("Where did I study?", "Which university did I go to?")),
    "degree": ("word", ("My degree is in {v}.", "I studied {v} for four years.",
               "People are surprised I majored in {v}, but I loved it."),
               ("What did I major in?", "What subject is my degree in?")),
    "language": ("word", ("I'm learning {v}.", "I take {v} lessons on Tuesdays.",
                 "My {v} homework is piling up, the grammar is tough."),
                 ("Which language am I studying?", "What lessons do I take on Tuesdays?")),
    "holiday": ("place", ("We are going on holiday to {v}.", "Our summer trip is to {v}.",
                "Booked it! Two weeks in {v} this summer, I can't wait."),
                ("Where are we going on holiday?", "What's our summer destination?")),
    "favourite cafe": ("company", ("My favourite café is {v}.", "I get my coffee at {v} every morning.",
                       "Sitting in {v} café right now, best coffee in town."),
                       ("Where do I get my coffee?", "Which café do I like best?")),
    "shoe size": ("number", ("My shoe size is {v}.", "I wear size {v} shoes.",
                  "These boots pinch, I should have ordered a {v}, my usual size."),
                  ("What size shoes do I wear?", "Which size are my boots?")),
    "plant": ("name", ("My houseplant is called {v}.", "I named my fern {v}.",
              "Watered {v} my fern today, she's finally growing new leaves."),
              ("What's my fern called?", "What did I name my houseplant?")),
    "goldfish": ("name", ("My goldfish is named {v}.", "The goldfish in my kitchen is called {v}.",
                 "Cleaned the tank this morning, {v} my goldfish looked delighted."),
                 ("What's my goldfish's name?", "What is the fish in my kitchen called?")),
    "running route": ("place", ("I run along {v} every morning.", "My morning jog follows {v}.",
                      "Beautiful sunrise on my run along {v} today."),
                      ("Where do I go running?", "Which route is my morning jog?")),
    "commute": ("company", ("I take the {v} line to work.", "The {v} line gets me to the office.",
                "Delays again on the {v} line, I was late for work."),
                ("Which line do I take to work?", "How do I get to the office?")),
    "godmother": ("name", ("My godmother's name is {v}.", "{v} is my godmother.",
                  "Got a postcard from {v}, my godmother, she's travelling again."),
                  ("Who is my godmother?", "What is my godmother called?")),
    "childhood pet": ("name", ("As a kid I had a hamster called {v}.", "My first pet was a hamster named {v}.",
                      "I still miss {v}, the hamster I had as a child."),
                      ("What was my first pet called?", "What was my childhood hamster's name?")),
    "password hint": ("word", ("My password hint is {v}.", "I set the hint to {v} for my laptop.",
                      "Forgot my laptop password again, luckily the hint is {v}."),
                      ("What's my laptop password hint?", "Which hint did I set on my laptop?")),
    "phone": ("number", ("My phone number ends in {v}.", "The last four digits of my mobile are {v}.",
              "New SIM card, so now my number ends in {v}."),
              ("How does my phone number end?", "What are the last digits of my mobile?")),
    "lucky number": ("number", ("My lucky number is {v}.", "I always bet on {v}.",
                     "Won a raffle with {v}, my lucky number, again!"),
                     ("What number brings me luck?", "Which number do I always bet on?")),
    "coworker": ("name", ("My desk neighbour at work is {v}.", "I share an office with {v}.",
                 "Lunch with {v}, who sits next to me at work, was fun."),
                 ("Who sits next to me at work?", "Who do I share an office with?")),
    "therapist": ("name", ("My therapist is Dr. {v}.", "I see Dr. {v} every Thursday.",
                  "Good session today with Dr. {v}, I feel lighter."),
                  ("Who do I see on Thursdays?", "What's my therapist's name?")),
    "car colour": ("word", ("My car is {v}.", "I drive a {v} hatchback.",
                   "Can't find my car in the car park, it's the {v} one, look out for it."),
                   ("What colour is my car?", "What does my hatchback look like?")),
    "allotment": ("code", ("My allotment plot is number {v}.", "I grow vegetables on plot {v}.",
                  "Harvested tomatoes from plot {v} at the allotment today."),
                  ("Which plot is my allotment?", "Where do I grow my vegetables?")),
}
# The first 16, plus the kinds of the statements quoted in the learning issue, which were tried
# by hand while the recipe was built (a daughter's instrument, a landlord, a birthplace, a night
# job, a cat named in a chatty message).
TUNING_KINDS = tuple(list(KINDS)[:16]) + ("daughter instrument", "landlord", "birthplace", "night job", "cat")
HELD_OUT_KINDS = tuple(k for k in KINDS if k not in TUNING_KINDS)

def made_up_value(rng: random.Random, value_type: str) -> str:
    if value_type == "number":
        return made_up_number(rng)
    if value_type == "code":
        return made_up_code(rng)
    if value_type == "date":
        return f"{rng.choice(('March', 'July', 'October', 'December'))} {rng.randint(2, 28)}"
    word = made_up_word(rng, (2, 3))
    return word.lower() if value_type == "word" else word


@dataclass(frozen=True)
class Fact:
    kind: str
    value: str
    statement: str
    questions: tuple[str, str]


@dataclass(frozen=True)
class BroadUser:
    name: str
    facts: tuple[Fact, ...]
    messages: tuple[str, ...]  # what the user writes, in order (some carry two facts)
    untaught: tuple[str, ...]  # questions about kinds this user never mentioned


def make_user(index: int, kinds: tuple[str, ...], facts_per_user: int, seed: int = 0) -> BroadUser:
    rng = random.Random(f"{seed}-{index}")
    chosen = rng.sample(kinds, facts_per_user)
    facts = []
    for kind in chosen:
        value_type, statements, questions = KINDS[kind]
        value = made_up_value(rng, value_type)
        facts.append(Fact(kind, value, rng.choice(statements).format(v=value), questions))
    messages: list[str] = []
    i = 0
    while i < len(facts):
        if i + 1 < len(facts) and rng.random() < 0.3:  # two facts in one message
            second = facts[i + 1].statement
            second = second if second.startswith(("I ", "I'")) else second[0].lower() + second[1:]
            messages.append(f"{facts[i].statement} Also, {second}")
            i += 2
        else:
            messages.append(facts[i].statement)
            i += 1
    others = [k for k in kinds if k not in chosen]
    untaught = tuple(KINDS[k][2][0] for k in rng.sample(others, min(3, len(others))))
    return BroadUser(f"broad-{index:02d}", tuple(facts), tuple(messages), untaught)
