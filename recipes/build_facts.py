"""Build data/facts/facts.jsonl: a curated CounterFact-style set of real-world facts.

Written by the locedit project, CC0. Python standard library only, fully deterministic:
running ``python recipes/build_facts.py`` rewrites data/facts/facts.jsonl byte-for-byte.

Layout of the tables below
--------------------------
Each relation has
  * ``pid``        Wikidata property id (or None),
  * ``templates``  main prompt templates; "{S}" marks the subject noun phrase,
  * ``para``       extra paraphrase-only templates,
  * ``gen``        open generation templates,
  * ``groups``     {true target: [subject, ...]}; every subject of a group shares the
                   true target, so the other members of the group are its neighbours.

A subject written as "the Eiffel Tower" carries a definite article: the article is kept in
the prompt text but not in the ``subject`` field ("Eiffel Tower"). At the start of a
prompt the article is capitalised ("The Eiffel Tower is located in the city of").

Counterfactual targets (``target_new``) are other true targets of the same relation,
chosen by a fixed rotation, so they are plausible values of the same type.
"""

from __future__ import annotations

import json
import os
import sys

OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "facts", "facts.jsonl")

MAX_NEIGHBOURS = 5
MIN_NEIGHBOURS = 3

RELATIONS: dict[str, dict] = {}

# --------------------------------------------------------------------------- landmarks
RELATIONS["landmark_city"] = dict(
    pid="P131",
    templates=[
        "{S} is located in the city of",
        "{S} can be found in the city of",
        "The city that is home to {S} is",
    ],
    para=[
        "{S} is a famous landmark in the city of",
        "Tourists who want to see {S} travel to the city of",
        "The famous {S} stands in the city of",
    ],
    gen=["{S} is a place where", "Visitors to {S} can"],
    groups={
        "Paris": ["the Eiffel Tower", "the Louvre", "the Arc de Triomphe", "the Champs-Élysées",
                  "the Sacré-Cœur Basilica", "the Musée d'Orsay", "the Centre Pompidou",
                  "the Notre-Dame Cathedral"],
        "London": ["Big Ben", "Tower Bridge", "Buckingham Palace", "Westminster Abbey",
                   "Trafalgar Square", "the British Museum", "St Paul's Cathedral", "Piccadilly Circus"],
        "Rome": ["the Colosseum", "the Trevi Fountain", "the Pantheon", "the Circus Maximus",
                 "Piazza Navona", "Castel Sant'Angelo"],
        "New York": ["the Statue of Liberty", "the Empire State Building", "Central Park", "Times Square",
                     "the Brooklyn Bridge", "Rockefeller Center", "the Chrysler Building",
                     "the Metropolitan Museum of Art", "Madison Square Garden"],
        "Barcelona": ["the Sagrada Família", "Park Güell", "Camp Nou", "La Rambla", "Casa Batlló"],
        "Moscow": ["Red Square", "the Kremlin", "Saint Basil's Cathedral", "the Bolshoi Theatre",
                   "Gorky Park"],
        "Berlin": ["the Brandenburg Gate", "the Reichstag building", "Checkpoint Charlie",
                   "Alexanderplatz", "Museum Island"],
        "Washington": ["the White House", "the Lincoln Memorial", "the United States Capitol",
                       "the Jefferson Memorial", "the National Mall"],
        "Beijing": ["the Forbidden City", "Tiananmen Square", "the Temple of Heaven", "the Summer Palace"],
        "Venice": ["St Mark's Basilica", "the Rialto Bridge", "the Doge's Palace", "the Bridge of Sighs"],
        "Istanbul": ["Hagia Sophia", "the Blue Mosque", "Topkapi Palace", "the Grand Bazaar",
                     "the Galata Tower"],
        "Athens": ["the Acropolis", "the Parthenon", "the Temple of Olympian Zeus",
                   "the Panathenaic Stadium"],
        "San Francisco": ["the Golden Gate Bridge", "Alcatraz Island", "Fisherman's Wharf",
                          "Lombard Street"],
        "Amsterdam": ["the Anne Frank House", "the Rijksmuseum", "the Van Gogh Museum", "Dam Square"],
    },
)

RELATIONS["landmark_country"] = dict(
    pid="P17",
    templates=[
        "{S} is located in the country of",
        "{S} is a famous landmark in",
        "The country that is home to {S} is",
    ],
    para=[
        "{S} can be found in the country of",
        "To see {S}, tourists travel to",
        "The famous {S} is situated in",
    ],
    gen=["{S} attracts visitors because", "The history of {S}"],
    groups={
        "Egypt": ["the Great Pyramid of Giza", "the Great Sphinx of Giza", "the Valley of the Kings",
                  "Abu Simbel", "the Karnak Temple"],
        "India": ["the Taj Mahal", "the Red Fort", "the Qutub Minar", "the Golden Temple", "the Hawa Mahal"],
        "China": ["the Great Wall", "the Forbidden City", "the Terracotta Army", "the Temple of Heaven",
                  "the Summer Palace"],
        "Italy": ["the Colosseum", "the Leaning Tower of Pisa", "the Trevi Fountain", "Mount Vesuvius",
                  "Pompeii", "the Uffizi Gallery"],
        "France": ["the Eiffel Tower", "Mont Saint-Michel", "the Palace of Versailles", "the Louvre",
                   "the Arc de Triomphe"],
        "Greece": ["the Parthenon", "the Acropolis", "Mount Olympus", "Delphi"],
        "Australia": ["Uluru", "the Great Barrier Reef", "the Sydney Opera House", "Bondi Beach"],
        "Japan": ["Mount Fuji", "Himeji Castle", "Kinkaku-ji", "the Fushimi Inari Shrine"],
        "Spain": ["the Sagrada Família", "the Alhambra", "Park Güell", "the Prado Museum"],
        "Russia": ["Red Square", "the Kremlin", "Lake Baikal", "Saint Basil's Cathedral",
                   "the Hermitage Museum"],
        "Turkey": ["Hagia Sophia", "the Blue Mosque", "Ephesus", "Pamukkale", "Topkapi Palace"],
        "Germany": ["the Brandenburg Gate", "Neuschwanstein Castle", "Cologne Cathedral",
                    "the Reichstag building"],
        "Brazil": ["Christ the Redeemer", "Sugarloaf Mountain", "Copacabana Beach", "the Maracanã Stadium"],
        "Mexico": ["Chichen Itza", "Teotihuacan", "Tulum", "Palenque"],
        "Peru": ["Machu Picchu", "the Colca Canyon", "Sacsayhuamán", "Chan Chan"],
    },
)

# --------------------------------------------------------------------------- geography
RELATIONS["city_country"] = dict(
    pid="P17",
    templates=[
        "{S} is a city in",
        "The city of {S} is located in",
        "{S} is a major city in the country of",
    ],
    para=[
        "{S} lies in the country of",
        "The country in which {S} is located is",
        "{S} is an important city in",
    ],
    gen=["{S} is a city where", "Life in {S}"],
    groups={
        "France": ["Lyon", "Marseille", "Toulouse", "Nice", "Bordeaux", "Strasbourg"],
        "Germany": ["Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden"],
        "Italy": ["Milan", "Naples", "Venice", "Florence", "Turin", "Bologna"],
        "Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao", "Málaga"],
        "Japan": ["Osaka", "Kyoto", "Yokohama", "Hiroshima", "Nagoya", "Sapporo"],
        "China": ["Shanghai", "Guangzhou", "Shenzhen", "Wuhan", "Chengdu", "Nanjing"],
        "India": ["Mumbai", "Bangalore", "Kolkata", "Chennai", "Jaipur", "Delhi"],
        "Brazil": ["São Paulo", "Rio de Janeiro", "Salvador", "Brasília", "Recife", "Fortaleza"],
        "Canada": ["Toronto", "Montreal", "Vancouver", "Calgary", "Ottawa", "Edmonton"],
        "Australia": ["Sydney", "Melbourne", "Brisbane", "Adelaide", "Canberra"],
        "Russia": ["Moscow", "Saint Petersburg", "Novosibirsk", "Kazan", "Yekaterinburg"],
    },
)

RELATIONS["country_language"] = dict(
    pid="P37",
    templates=[
        "The official language of {S} is",
        "In {S}, the official language is",
        "{S} has as its official language",
    ],
    para=[
        "The language officially used by the government of {S} is",
        "The main official language of {S} is",
    ],
    gen=["People in {S} speak", "The culture of {S}"],
    groups={
        "Spanish": ["Spain", "Mexico", "Argentina", "Colombia", "Peru", "Chile", "Venezuela", "Cuba",
                    "Ecuador", "Uruguay"],
        "Portuguese": ["Portugal", "Brazil", "Angola", "Mozambique", "Cape Verde"],
        "Arabic": ["Saudi Arabia", "Egypt", "Iraq", "Syria", "Jordan", "Libya", "Yemen", "Kuwait"],
        "French": ["France", "Monaco", "Senegal", "Ivory Coast"],
    },
)

RELATIONS["country_currency"] = dict(
    pid="P38",
    templates=[
        "The currency of {S} is the",
        "In {S}, people pay for things with the",
        "The official currency used in {S} is the",
    ],
    para=[
        "{S} uses a currency called the",
        "The money used in {S} is the",
    ],
    gen=["The economy of {S}", "Shopping in {S}"],
    groups={
        "euro": ["Austria", "Belgium", "Croatia", "Cyprus", "Estonia", "Finland", "France", "Germany",
                 "Greece", "Ireland", "Italy", "Latvia", "Lithuania", "Luxembourg", "Malta",
                 "the Netherlands", "Portugal", "Slovakia", "Slovenia", "Spain"],
        "peso": ["Mexico", "Argentina", "Chile", "Colombia", "Cuba", "Uruguay", "the Philippines"],
        "rupee": ["India", "Pakistan", "Nepal", "Sri Lanka", "Mauritius"],
        "dinar": ["Iraq", "Jordan", "Kuwait", "Bahrain", "Tunisia", "Algeria", "Libya", "Serbia"],
        "dollar": ["the United States", "Canada", "Australia", "New Zealand", "Singapore", "Jamaica"],
    },
)

RELATIONS["country_continent"] = dict(
    pid="P30",
    templates=[
        "{S} is a country located in",
        "{S} is a country on the continent of",
        "The continent where {S} is located is",
    ],
    para=[
        "{S} lies on the continent of",
        "Geographically, {S} is part of",
    ],
    gen=["{S} is a country that", "Travelling through {S}"],
    groups={
        "Europe": ["France", "Germany", "Italy", "Spain", "Poland", "Portugal", "Sweden", "Norway",
                   "Austria", "Greece", "the Netherlands", "Switzerland"],
        "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "Pakistan", "Nepal", "Mongolia",
                 "Bangladesh", "South Korea", "Malaysia", "Cambodia"],
        "Africa": ["Nigeria", "Kenya", "Ethiopia", "Ghana", "Morocco", "Zambia", "Tanzania", "Uganda",
                   "Senegal", "Algeria", "Zimbabwe", "Cameroon"],
        "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador",
                          "Bolivia", "Uruguay", "Paraguay"],
        "North America": ["Canada", "Mexico", "the United States", "Cuba", "Jamaica", "Guatemala"],
    },
)

RELATIONS["river_continent"] = dict(
    pid="P30",
    templates=[
        "{S} is a river in",
        "{S} flows across the continent of",
        "The continent through which {S} flows is",
    ],
    para=[
        "{S} is a major river of",
        "{S} river is located in",
    ],
    gen=["{S} is a river that", "Along the banks of {S}"],
    groups={
        "Africa": ["the Nile", "the Congo", "the Niger", "the Zambezi", "the Limpopo"],
        "Europe": ["the Danube", "the Rhine", "the Volga", "the Thames", "the Seine", "the Loire",
                   "the Elbe", "the Tiber", "the Dnieper", "the Vistula"],
        "Asia": ["the Yangtze", "the Ganges", "the Mekong", "the Indus", "the Euphrates", "the Tigris",
                 "the Brahmaputra", "the Irrawaddy"],
        "South America": ["the Amazon", "the Orinoco", "the Paraná", "the Magdalena"],
        "North America": ["the Mississippi", "the Missouri", "the Yukon", "the Hudson", "the Rio Grande",
                          "the St. Lawrence"],
    },
)

# --------------------------------------------------------------------------- companies / products
RELATIONS["company_country"] = dict(
    pid="P17",
    templates=[
        "{S} is a company headquartered in",
        "The headquarters of {S} are located in",
        "{S} is a company from",
    ],
    para=[
        "{S} has its headquarters in",
        "The company {S} is based in",
    ],
    gen=["{S} is a company that", "The products of {S}"],
    groups={
        "Japan": ["Sony", "Toyota", "Nintendo", "Honda", "Panasonic", "Canon", "Nissan", "Toshiba"],
        "Germany": ["BMW", "Volkswagen", "Siemens", "Adidas", "Porsche", "Bosch", "Audi"],
        "South Korea": ["Samsung", "Hyundai", "LG", "Kia"],
        "France": ["Renault", "Peugeot", "Michelin", "Danone", "L'Oréal", "Louis Vuitton"],
        "Italy": ["Ferrari", "Lamborghini", "Prada", "Gucci", "Pirelli", "Barilla"],
        "Sweden": ["Volvo", "Ericsson", "H&M", "Saab", "Electrolux"],
        "Switzerland": ["Nestlé", "Rolex", "Novartis", "Roche", "Swatch"],
        # (no "the Netherlands" / "the United States": targets needing an article read badly here)
    },
)

RELATIONS["product_manufacturer"] = dict(
    pid="P176",
    templates=[
        "{S} is manufactured by",
        "{S} is a product made by",
        "The company that makes {S} is",
    ],
    para=[
        "The manufacturer of {S} is",
        "{S} is produced by the company",
    ],
    gen=["{S} is a product that", "People who own {S}"],
    groups={
        "Apple": ["the iPhone", "the iPad", "the MacBook", "the iMac", "the iPod", "the Macintosh"],
        "Sony": ["the PlayStation", "the Walkman", "the Discman", "the Xperia"],
        "Nintendo": ["the Game Boy", "the Wii", "the GameCube", "the Famicom"],
        "Microsoft": ["the Xbox", "the Surface", "the Kinect", "the HoloLens"],
        "Toyota": ["the Corolla", "the Camry", "the Prius", "the RAV4", "the Land Cruiser"],
        "Ford": ["the Mustang", "the F-150", "the Model T", "the Fiesta"],
        "Chevrolet": ["the Corvette", "the Camaro", "the Impala", "the Silverado"],
        "Volkswagen": ["the Passat", "the Jetta", "the Tiguan", "the Touareg", "the Beetle"],
        "Honda": ["the Civic", "the Accord", "the CR-V", "the NSX"],
        "Boeing": ["the 747", "the 737", "the 777", "the 787 Dreamliner"],
        "Airbus": ["the A380", "the A320", "the A350", "the A330"],
    },
)

RELATIONS["software_developer"] = dict(
    pid="P178",
    templates=[
        "{S} is developed by",
        "{S} is a software product created by",
        "The company behind {S} is",
    ],
    para=[
        "The developer of {S} is",
        "{S} was made by the company",
    ],
    gen=["{S} is software that", "Users of {S}"],
    groups={
        "Microsoft": ["Windows", "Excel", "PowerPoint", "Outlook", "Internet Explorer", "Visual Studio"],
        "Google": ["Gmail", "Android", "Chrome", "TensorFlow"],
        "Adobe": ["Photoshop", "Illustrator", "Acrobat", "Premiere Pro", "InDesign", "Lightroom"],
        "Apple": ["Safari", "iTunes", "macOS", "iOS", "Final Cut Pro"],
    },
)

# --------------------------------------------------------------------------- people
RELATIONS["athlete_sport"] = dict(
    pid="P641",
    templates=[
        "{S} is famous for playing",
        "The sport played by {S} is",
        "{S} is a legendary player of",
    ],
    para=[
        "{S} became famous playing",
        "{S} is widely known for playing",
        "The sport in which {S} became a star is",
    ],
    gen=["{S} is an athlete who", "Fans of {S}"],
    groups={
        "basketball": ["Michael Jordan", "LeBron James", "Kobe Bryant", "Shaquille O'Neal", "Magic Johnson",
                       "Larry Bird", "Stephen Curry", "Kareem Abdul-Jabbar", "Kevin Durant"],
        "tennis": ["Roger Federer", "Rafael Nadal", "Novak Djokovic", "Serena Williams", "Andre Agassi",
                   "Pete Sampras", "Steffi Graf", "Björn Borg", "Andy Murray"],
        "golf": ["Tiger Woods", "Jack Nicklaus", "Arnold Palmer", "Phil Mickelson", "Rory McIlroy"],
        "baseball": ["Babe Ruth", "Derek Jeter", "Jackie Robinson", "Lou Gehrig", "Hank Aaron", "Willie Mays"],
        "hockey": ["Wayne Gretzky", "Sidney Crosby", "Mario Lemieux", "Alexander Ovechkin", "Bobby Orr"],
        "cricket": ["Sachin Tendulkar", "Don Bradman", "Brian Lara", "Shane Warne", "Virat Kohli"],
    },
)

RELATIONS["musician_instrument"] = dict(
    pid="P1303",
    templates=[
        "{S} is known for playing the",
        "The musical instrument played by {S} is the",
        "{S} became famous playing the",
    ],
    para=[
        "{S} is a master of the",
        "The instrument that made {S} famous is the",
    ],
    gen=["{S} is a musician who", "The music of {S}"],
    groups={
        "guitar": ["Jimi Hendrix", "Eric Clapton", "Jimmy Page", "B.B. King", "Carlos Santana",
                   "Eddie Van Halen", "Slash", "Stevie Ray Vaughan", "Keith Richards"],
        "piano": ["Frédéric Chopin", "Franz Liszt", "Glenn Gould", "Vladimir Horowitz", "Lang Lang",
                  "Arthur Rubinstein", "Billy Joel", "Elton John"],
        "drums": ["Ringo Starr", "John Bonham", "Keith Moon", "Neil Peart", "Buddy Rich", "Travis Barker",
                  "Lars Ulrich"],
        "trumpet": ["Louis Armstrong", "Miles Davis", "Dizzy Gillespie", "Chet Baker", "Wynton Marsalis"],
        "saxophone": ["Charlie Parker", "John Coltrane", "Kenny G", "Sonny Rollins", "Stan Getz"],
        "violin": ["Niccolò Paganini", "Itzhak Perlman", "Yehudi Menuhin", "Jascha Heifetz", "Joshua Bell"],
        "cello": ["Yo-Yo Ma", "Jacqueline du Pré", "Pablo Casals", "Mstislav Rostropovich"],
    },
)

RELATIONS["person_citizenship"] = dict(
    pid="P27",
    templates=[
        "{S} is a citizen of",
        "{S} holds citizenship of",
        "The country of citizenship of {S} is",
    ],
    para=[
        "{S} is a national of",
        "{S} has the nationality of",
    ],
    gen=["{S} is a person who", "The life of {S}"],
    groups={
        "France": ["Emmanuel Macron", "Jacques Chirac", "Nicolas Sarkozy", "François Hollande",
                   "Zinedine Zidane", "Kylian Mbappé", "Marion Cotillard", "Thierry Henry", "Juliette Binoche"],
        "Italy": ["Silvio Berlusconi", "Luciano Pavarotti", "Andrea Bocelli", "Giorgio Armani",
                  "Valentino Rossi", "Roberto Benigni", "Sergio Mattarella", "Giorgia Meloni"],
        "Germany": ["Angela Merkel", "Helmut Kohl", "Olaf Scholz", "Michael Schumacher", "Sebastian Vettel",
                    "Franz Beckenbauer", "Dirk Nowitzki", "Steffi Graf"],
        "Japan": ["Hayao Miyazaki", "Akira Kurosawa", "Shinzo Abe", "Haruki Murakami", "Shohei Ohtani",
                  "Ichiro Suzuki", "Takeshi Kitano"],
        "Russia": ["Vladimir Putin", "Dmitry Medvedev", "Sergey Lavrov", "Alexander Ovechkin",
                   "Maria Sharapova"],
        "Spain": ["Rafael Nadal", "Pedro Almodóvar", "Penélope Cruz", "Antonio Banderas", "Fernando Alonso",
                  "Pau Gasol", "Andrés Iniesta"],
        "Brazil": ["Pelé", "Neymar", "Ronaldinho", "Lula da Silva", "Ayrton Senna", "Gisele Bündchen"],
        "India": ["Narendra Modi", "Sachin Tendulkar", "Shah Rukh Khan", "Virat Kohli", "Amitabh Bachchan",
                  "Aishwarya Rai"],
        "China": ["Xi Jinping", "Yao Ming", "Zhang Yimou", "Li Na", "Mao Zedong"],
    },
)

RELATIONS["person_occupation"] = dict(
    pid="P106",
    templates=[
        "{S} is best known as a",
        "By profession, {S} was a",
        "{S} is widely regarded as a great",
    ],
    para=[
        "{S} earned lasting fame as a",
        "{S} worked as a",
    ],
    gen=["{S} is remembered for", "The work of {S}"],
    groups={
        "painter": ["Pablo Picasso", "Vincent van Gogh", "Claude Monet", "Rembrandt", "Salvador Dalí",
                    "Frida Kahlo", "Henri Matisse", "Paul Cézanne", "Edvard Munch"],
        "composer": ["Wolfgang Amadeus Mozart", "Ludwig van Beethoven", "Johann Sebastian Bach",
                     "Pyotr Ilyich Tchaikovsky", "Antonio Vivaldi", "Johannes Brahms", "Richard Wagner",
                     "Giuseppe Verdi", "Joseph Haydn", "Franz Schubert"],
        "physicist": ["Albert Einstein", "Niels Bohr", "Richard Feynman", "Max Planck", "Stephen Hawking",
                      "Werner Heisenberg", "Erwin Schrödinger", "Enrico Fermi"],
        "philosopher": ["Plato", "Aristotle", "Socrates", "Immanuel Kant", "Friedrich Nietzsche",
                        "René Descartes", "Confucius", "David Hume", "Baruch Spinoza"],
        "poet": ["Emily Dickinson", "Walt Whitman", "William Wordsworth", "John Keats", "Robert Frost",
                 "Lord Byron", "Percy Bysshe Shelley"],
        "mathematician": ["Carl Friedrich Gauss", "Leonhard Euler", "Euclid", "Srinivasa Ramanujan",
                          "Bernhard Riemann", "David Hilbert"],
    },
)


# --------------------------------------------------------------------------- generation
def split_article(entry: str) -> tuple[str, str]:
    """'the Eiffel Tower' -> ('the', 'Eiffel Tower'); 'Big Ben' -> ('', 'Big Ben')."""
    if entry.startswith("the "):
        return "the", entry[4:]
    return "", entry


def render(template: str, subject_slot: str, article: str) -> str:
    """Fill "{S}" with the article and ``subject_slot`` (a subject or "{}")."""
    phrase = f"{article} {subject_slot}" if article else subject_slot
    text = template.replace("{S}", phrase)
    if article and text.startswith(article):  # capitalise a leading article only
        text = text[0].upper() + text[1:]
    # "The famous {S}" templates already carry an article of their own
    text = text.replace("The famous the ", "The famous ")
    return text


def build() -> list[dict]:
    rows: list[dict] = []
    for relation_id, rel in RELATIONS.items():
        templates, para, gen = rel["templates"], rel["para"], rel["gen"]
        targets = list(rel["groups"])
        k = 0  # running index of the fact inside the relation
        for target in targets:
            members = [split_article(e) for e in rel["groups"][target]]
            others = [t for t in targets if t != target]
            for i, (article, subject) in enumerate(members):
                t_idx = k % len(templates)
                prompt = render(templates[t_idx], "{}", article)
                paraphrases = [render(templates[j], subject, article)
                               for j in range(len(templates)) if j != t_idx]
                paraphrases.append(render(para[k % len(para)], subject, article))
                n_nb = min(MAX_NEIGHBOURS, len(members) - 1)
                neighbours = []
                for step in range(1, n_nb + 1):
                    nb_article, nb_subject = members[(i + step) % len(members)]
                    tpl = templates[(t_idx + step) % len(templates)]
                    neighbours.append(render(tpl, nb_subject, nb_article))
                generation = [render(g, subject, article) for g in gen]
                target_new = others[k % len(others)]
                rows.append({
                    "case_id": len(rows),
                    "relation_id": relation_id,
                    "relation_pid": rel["pid"],
                    "requested_rewrite": {
                        "prompt": prompt,
                        "subject": subject,
                        "target_true": {"str": target},
                        "target_new": {"str": target_new},
                        "relation_id": relation_id,
                    },
                    "paraphrase_prompts": paraphrases,
                    "neighborhood_prompts": neighbours,
                    "generation_prompts": generation,
                    "_neighbour_subjects": [members[(i + s) % len(members)][1] for s in range(1, n_nb + 1)],
                })
                k += 1
    return rows


def validate(rows: list[dict]) -> dict[str, int]:
    assert len(rows) >= 330, len(rows)
    counts: dict[str, int] = {}
    seen_pairs: set[tuple[str, str]] = set()
    ids = [r["case_id"] for r in rows]
    assert ids == list(range(len(rows))) and len(set(ids)) == len(ids)
    for r in rows:
        rw = r["requested_rewrite"]
        subj, rel = rw["subject"], r["relation_id"]
        t_true, t_new = rw["target_true"]["str"], rw["target_new"]["str"]
        assert rw["relation_id"] == rel
        assert (subj, rel) not in seen_pairs, (subj, rel)
        seen_pairs.add((subj, rel))
        assert rw["prompt"].count("{}") == 1, rw["prompt"]
        assert not rw["prompt"].endswith(" ") and not rw["prompt"].endswith("{}"), rw["prompt"]
        assert t_true and t_new and t_new != t_true
        assert t_true == t_true.strip() and t_new == t_new.strip()
        assert t_true.lower() not in subj.lower(), (subj, t_true)  # no give-away in the subject
        assert len(r["paraphrase_prompts"]) >= 2
        assert len(set(r["paraphrase_prompts"])) == len(r["paraphrase_prompts"])
        for p in r["paraphrase_prompts"]:
            assert "{}" not in p and subj in p and not p.endswith(" "), p
            assert p != rw["prompt"].replace("{}", subj)
        assert len(r["neighborhood_prompts"]) >= MIN_NEIGHBOURS
        for p, nb in zip(r["neighborhood_prompts"], r["_neighbour_subjects"]):
            assert "{}" not in p and nb in p and nb != subj, (p, subj)
            assert subj not in p, (p, subj)
        assert 1 <= len(r["generation_prompts"]) <= 2
        for p in r["generation_prompts"]:
            assert subj in p and "{}" not in p
        counts[rel] = counts.get(rel, 0) + 1
    assert len(counts) >= 13, counts
    return counts


def main() -> int:
    rows = build()
    counts = validate(rows)
    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    with open(OUT_PATH, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if not k.startswith("_")}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    for rel, n in counts.items():
        print(f"{rel:22s} {n:4d}  ({RELATIONS[rel]['pid']})")
    print(f"{'total':22s} {len(rows):4d}  relations={len(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
