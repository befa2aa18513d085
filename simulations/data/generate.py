#!/usr/bin/env python3
"""Generate the bundled fedtune demo datasets (medical, legal, financial).

Every record is synthetic: it is composed from hand-written component lists
in this file with a fixed random seed, so running the script always writes
the same six files:

    simulations/data/<domain>/train.jsonl   (180 records)
    simulations/data/<domain>/eval.jsonl    (40 records)

Each answer is a short label from a small fixed label set, and the label is
determined by the content of the question (symptom severity, clause wording,
merchant type), so a model can learn it.  No input text appears twice, so
train and eval never share an input.

Standard library only.  Usage: python simulations/data/generate.py
"""

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent
N_TRAIN = 180
N_EVAL = 40
SEED = 20240611


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def split_counts(labels, total):
    """Spread `total` items over labels as evenly as possible (first labels
    get the remainder)."""
    base, extra = divmod(total, len(labels))
    return {lab: base + (1 if i < extra else 0) for i, lab in enumerate(labels)}


def build_splits(rng, labels, make_input, eval_extra_order=None):
    """Draw unique inputs per label, then split into balanced train/eval.

    make_input(rng, label) -> str.  Returns (train, eval) lists of
    (input, label), each shuffled.
    """
    train_counts = split_counts(labels, N_TRAIN)
    eval_counts = split_counts(eval_extra_order or labels, N_EVAL)
    seen = set()
    train, evl = [], []
    for lab in labels:
        need = train_counts[lab] + eval_counts[lab]
        items = []
        tries = 0
        while len(items) < need:
            tries += 1
            if tries > 200000:
                raise RuntimeError(f"not enough distinct inputs for {lab!r}")
            text = make_input(rng, lab)
            key = " ".join(text.lower().split())
            if key in seen:
                continue
            seen.add(key)
            items.append(text)
        train += [(t, lab) for t in items[: train_counts[lab]]]
        evl += [(t, lab) for t in items[train_counts[lab] :]]
    rng.shuffle(train)
    rng.shuffle(evl)
    return train, evl


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# medical: triage urgency (chat "messages" format)
# --------------------------------------------------------------------------

MED_LABELS = ["emergency", "urgent", "routine"]
MED_PROMPT = (
    "Triage the following patient situation. "
    "Answer with one word: emergency, urgent or routine.\n\n"
    "Situation: {situation}"
)

MED_SYMPTOMS = {
    "emergency": [
        "crushing chest pain spreading to the left arm and jaw",
        "sudden drooping of one side of the face and slurred speech",
        "severe shortness of breath with bluish lips",
        "throat swelling and wheezing minutes after a bee sting",
        "a seizure that has lasted more than five minutes",
        "a sudden, severe headache, the worst they have ever had",
        "heavy bleeding from a leg wound that does not stop with firm pressure",
        "vomiting large amounts of bright red blood",
        "a high fever, a stiff neck and a purple rash that does not fade when pressed",
        "sudden weakness in one arm and leg together with confusion",
        "chest pain with heavy sweating, nausea and light-headedness",
        "loss of consciousness after a fall down a flight of stairs",
        "a deep burn from boiling oil covering most of the forearm and hand",
        "severe abdominal pain with a rigid, board-like abdomen",
        "sudden sharp chest pain and coughing up blood after a long-haul flight",
        "extreme drowsiness after swallowing a whole bottle of sleeping tablets",
        "lip and tongue swelling with difficulty breathing after eating peanuts",
        "repeated vomiting and increasing drowsiness after a blow to the head",
        "a broken shin bone with bone visible through the skin",
        "fever, new confusion, a racing pulse and cold, mottled skin",
        "a sudden, painless loss of vision in one eye",
        "black, tarry stools and fainting on standing up",
    ],
    "urgent": [
        "a twisted ankle that is swollen and bruised but can still bear weight",
        "burning on urination and a mild fever",
        "ear pain and a temperature of 38.5 °C",
        "a cut on the finger that has stopped bleeding but gapes open and probably needs stitches",
        "a sore throat with white patches on the tonsils and a fever",
        "vomiting and diarrhoea while still able to keep small sips of fluid down",
        "a red, warm, tender patch on the lower leg that is slowly spreading",
        "a painful wrist after a fall on an outstretched hand, with no visible deformity",
        "a cough with green phlegm and a fever",
        "a painful red eye with sticky discharge",
        "an itchy rash that appeared after starting a new antibiotic, with no breathing problems",
        "lower back pain after lifting boxes, still able to walk",
        "a blistered burn about the size of a coin on the palm",
        "a dog bite on the hand with small puncture wounds, bleeding controlled",
        "wheezing that improves with their reliever inhaler but keeps returning",
        "a migraine like previous ones that is not eased by their usual tablets",
        "a toothache with mild facial swelling, breathing normally",
        "a fishing hook stuck in the thumb",
        "pain in the side, frequent urination and a low fever",
        "a splinter deep under a fingernail that is turning red and throbbing",
    ],
    # routine complaints (fit the same templates as the symptoms above)
    "routine": [
        "dry, itchy skin on the elbows",
        "occasional mild heartburn after large meals",
        "mild morning stiffness in one knee",
        "dandruff that has not improved with ordinary shampoo",
        "a small wart on the finger",
        "mild sneezing and an itchy nose every spring",
        "a mole that has looked the same for years",
        "trouble falling asleep on some nights",
        "slightly brittle fingernails",
        "mild constipation that eases with more fruit and water",
        "a few painless skin tags on the neck",
        "mild calf cramps at night now and then",
    ],
}

# routine requests (administrative / preventive visits)
MED_ROUTINE_REQUESTS = [
    "a refill of a long-standing blood-pressure prescription",
    "an annual physical examination",
    "a seasonal flu vaccination",
    "a follow-up on cholesterol results that were stable last time",
    "a travel vaccination consultation for a trip in two months",
    "a medical form to be signed for a sports club",
    "advice on how to stop smoking",
    "a routine diabetes check-up with stable blood sugars",
    "a repeat prescription for the contraceptive pill",
    "a blood test their specialist requested for next month",
    "a cholesterol screening",
    "advice on a healthy weight-loss plan",
    "a review of their long-term thyroid medication",
    "a tetanus booster that is due this year",
    "a copy of their vaccination record",
]

MED_ONSET = {
    "emergency": [
        "starting about twenty minutes ago",
        "beginning suddenly an hour ago",
        "starting just now",
        "beginning ten minutes ago at work",
        "since waking up this morning",
        "coming on within the last half hour",
    ],
    "urgent": [
        "for the past two days",
        "since yesterday evening",
        "since this morning",
        "for about a day and a half",
        "since the day before yesterday",
        "for around 24 hours",
    ],
    "routine": [
        "for several months",
        "on and off for about a year",
        "unchanged for many weeks",
        "for a long time",
        "stable for months",
        "for the last few months",
    ],
}

MED_CONTEXT = [
    "",
    "",
    "They have no known allergies.",
    "They take no regular medication.",
    "They have a history of high blood pressure.",
    "They live alone.",
    "They are otherwise healthy.",
    "They have type 2 diabetes.",
    "They are a non-smoker.",
    "They had a knee operation last year.",
]

MED_NAMES = [
    "Arlo Penwick",
    "Mira Castell",
    "Tobias Renn",
    "Ines Varga",
    "Dario Lume",
    "Hana Okoro",
    "Felix Brandt",
    "Sunniva Hale",
    "Rafe Delmont",
    "Priya Anand",
    "Lucan Ferro",
    "Odile Marsh",
    "Yusuf Tarik",
    "Greta Solberg",
    "Nico Albani",
    "Esme Quill",
    "Joren Vale",
    "Amara Nwosu",
    "Kit Ashdown",
    "Leona Brisk",
]
MED_RELATIVES = [
    "mother",
    "father",
    "partner",
    "brother",
    "sister",
    "neighbour",
    "flatmate",
    "colleague",
    "husband",
    "wife",
    "grandmother",
    "grandfather",
]
MED_SEX = [("man", "male"), ("woman", "female")]

MED_SYMPTOM_TEMPLATES = [
    "A {age}-year-old {sex} presents with {item}, {onset}. {context}",
    "{name} ({age}) phones the nurse line reporting {item}, {onset}. {context}",
    "Triage note: {sexadj}, {age} years old, {item}, {onset}. {context}",
    "A walk-in patient aged {age} describes {item}, {onset}. {context}",
    "The caller says their {relative}, who is {age}, has {item}, {onset}.",
    "{name}, a {age}-year-old {sex}, arrives at reception with {item}, {onset}. {context}",
    "Message via the patient portal from a {age}-year-old {sex}: {item}, {onset}. {context}",
]
MED_REQUEST_TEMPLATES = [
    "A {age}-year-old {sex} would like to book {item}. {context}",
    "{name} ({age}) messages the clinic asking for {item}. {context}",
    "Appointment request: {sexadj}, {age} years old, needs {item}; no new symptoms. {context}",
    "The caller asks to arrange {item} for their {relative}, who is {age} and feeling well.",
    "{name}, a {age}-year-old {sex}, emails to request {item}. {context}",
]


def make_medical(rng, label):
    sex, sexadj = rng.choice(MED_SEX)
    fields = dict(
        age=rng.randint(18, 88),
        sex=sex,
        sexadj=sexadj,
        name=rng.choice(MED_NAMES),
        relative=rng.choice(MED_RELATIVES),
        context=rng.choice(MED_CONTEXT),
    )
    if label == "routine" and rng.random() < 0.5:
        fields["item"] = rng.choice(MED_ROUTINE_REQUESTS)
        tpl = rng.choice(MED_REQUEST_TEMPLATES)
    else:
        fields["item"] = rng.choice(MED_SYMPTOMS[label])
        fields["onset"] = rng.choice(MED_ONSET[label])
        tpl = rng.choice(MED_SYMPTOM_TEMPLATES)
    text = tpl.format(**fields).strip()
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------
# legal: contract clause type (Alpaca format)
# --------------------------------------------------------------------------

LEGAL_LABELS = ["termination", "confidentiality", "indemnification", "payment", "governing-law"]
LEGAL_INSTRUCTION = (
    "Classify the type of the following contract clause. Answer with one label: "
    "termination, confidentiality, indemnification, payment or governing-law."
)

LEGAL_PARTIES = [
    ("the Supplier", "the Customer"),
    ("the Licensor", "the Licensee"),
    ("the Service Provider", "the Client"),
    ("the Consultant", "the Company"),
    ("the Seller", "the Buyer"),
    ("the Landlord", "the Tenant"),
    ("the Contractor", "the Owner"),
    ("the Distributor", "the Manufacturer"),
]
LEGAL_SUBJECTS = [
    "Software",
    "Services",
    "Licensed Materials",
    "Premises",
    "Equipment",
    "Platform",
    "Deliverables",
    "Products",
]
LEGAL_INFO = [
    "the terms of this Agreement",
    "its pricing and customer lists",
    "any source code, designs or technical data",
    "the results of the pilot study",
    "business plans and financial forecasts",
    "trade secrets relating to the {subject}",
    "personal data received from the other party",
    "the contents of any audit report",
]
LEGAL_HARM = [
    "personal injury or death",
    "damage to property",
    "a data security breach",
    "a product defect",
    "the infringement of a third party's patent",
    "environmental contamination",
]
LEGAL_JURIS = [
    ("England and Wales", "London"),
    ("the State of New York", "New York County"),
    ("the State of Delaware", "Wilmington, Delaware"),
    ("the Province of Ontario", "Toronto"),
    ("Singapore", "Singapore"),
    ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"),
    ("New South Wales", "Sydney"),
    ("Switzerland", "Zurich"),
    ("the State of California", "San Francisco"),
    ("Scotland", "Edinburgh"),
]
LEGAL_AMOUNTS = ["USD 4,500", "EUR 12,000", "GBP 850", "USD 27,300", "EUR 1,950", "GBP 6,400", "USD 980", "EUR 48,000"]

LEGAL_TEMPLATES = {
    "termination": [
        "Either party may terminate this Agreement for convenience by giving the other party not less than {n} days' written notice.",
        "{A} may terminate this Agreement with immediate effect if {B} commits a material breach and fails to remedy it within {m} days of receiving written notice of the breach.",
        "This Agreement shall end on expiry of the Initial Term unless renewed in writing, and either party may elect not to renew by notice given at least {n} days before expiry.",
        "Either party may bring this Agreement to an end immediately by written notice if the other party becomes insolvent, enters into administration or makes an arrangement with its creditors.",
        "Upon termination or expiry of this Agreement for any reason, {B} shall cease all use of the {subject} and return or destroy all related materials within {m} days.",
        "{B} may end this Agreement at any time after the first {k} months by giving {n} days' notice in writing to {A}.",
        "If a force majeure event continues for more than {n} days, either party may terminate this Agreement by written notice without liability.",
    ],
    "confidentiality": [
        "{B} shall keep confidential all Confidential Information disclosed by {A} and shall not disclose it to any third party without {A}'s prior written consent.",
        "Each party shall use the other party's Confidential Information solely for the purpose of performing this Agreement and shall protect it with at least a reasonable degree of care.",
        "The obligations of non-disclosure in this clause shall survive for {y} years after the termination of this Agreement.",
        "{B} may disclose {info} only to those of its employees and advisers who need to know it and who are bound by written obligations of secrecy no less strict than these.",
        "Information that is publicly available, already lawfully known to the receiving party or independently developed shall not be treated as Confidential Information.",
        "Neither party shall reveal {info} to any person, except as required by law or by order of a competent court, in which case it shall give the other party prompt notice.",
        "On request, {B} shall return or securely destroy all documents containing {info} and certify in writing that it has done so.",
    ],
    "indemnification": [
        "{A} shall indemnify and hold harmless {B} against all losses, damages, costs and expenses arising from any claim that the {subject} infringes the intellectual property rights of a third party.",
        "{B} agrees to defend, indemnify and hold {A} harmless from any third-party claim resulting from {B}'s negligence or wilful misconduct.",
        "Each party shall compensate the other for all losses, liabilities and reasonable legal fees incurred as a result of any breach of its warranties under this Agreement.",
        "{A} will defend at its own expense any claim brought against {B} for {harm} caused by the {subject}, and will pay any damages finally awarded.",
        "The indemnified party shall notify the indemnifying party promptly of any claim and allow it to control the defence and settlement of that claim.",
        "{B} shall hold {A} harmless from all liabilities, fines and expenses arising out of {harm} attributable to {B}'s use of the {subject}.",
    ],
    "payment": [
        "{B} shall pay each invoice within {d} days of the invoice date by bank transfer to the account nominated by {A}.",
        "The fees of {amt} per month are payable in advance on the first business day of each month.",
        "Late payments shall bear interest at {r}% per month from the due date until paid in full.",
        "{A} will invoice {B} {freq} for the {subject} supplied, and all amounts are stated exclusive of applicable taxes.",
        "A deposit of {pct}% of the total price is due upon signature, with the balance payable on delivery of the {subject}.",
        "If any undisputed amount remains unpaid more than {d} days after its due date, {A} may suspend performance until payment is received.",
        "All sums due under this Agreement shall be paid in {cur} without set-off, deduction or withholding.",
    ],
    "governing-law": [
        "This Agreement shall be governed by and construed in accordance with the laws of {jur}.",
        "Any dispute arising out of or in connection with this Agreement shall be subject to the exclusive jurisdiction of the courts of {city}.",
        "The parties submit to the non-exclusive jurisdiction of the courts located in {city}, and this Agreement is governed by the law of {jur}.",
        "The rights and obligations of the parties shall be interpreted under the laws of {jur}, without regard to its conflict-of-laws rules.",
        "The United Nations Convention on Contracts for the International Sale of Goods shall not apply, and this Agreement is subject to the laws of {jur}.",
        "Any controversy arising under this Agreement shall be finally settled by arbitration seated in {city}, applying the substantive law of {jur}.",
    ],
}
LEGAL_NUMBERING = ["", "", "", "{a}.{b} ", "Clause {a}.{b}: ", "({c}) ", "Section {a}. "]


def make_legal(rng, label):
    a_party, b_party = rng.choice(LEGAL_PARTIES)
    if rng.random() < 0.5:
        a_party, b_party = b_party, a_party
    subject = rng.choice(LEGAL_SUBJECTS)
    jur, city = rng.choice(LEGAL_JURIS)
    fields = dict(
        A=a_party,
        B=b_party,
        subject=subject,
        info=rng.choice(LEGAL_INFO).format(subject=subject),
        harm=rng.choice(LEGAL_HARM),
        jur=jur,
        city=city,
        n=rng.choice([14, 30, 45, 60, 90, 120, 180]),
        m=rng.choice([7, 10, 15, 20, 30]),
        k=rng.choice([3, 6, 12, 18, 24]),
        y=rng.choice([2, 3, 5, 7, 10]),
        d=rng.choice([14, 21, 30, 45, 60]),
        amt=rng.choice(LEGAL_AMOUNTS),
        r=rng.choice(["1", "1.5", "2", "0.75"]),
        freq=rng.choice(
            [
                "monthly in arrears",
                "quarterly in advance",
                "upon completion of each milestone",
                "at the end of each calendar month",
            ]
        ),
        pct=rng.choice([10, 15, 20, 25, 30, 40, 50]),
        cur=rng.choice(["US dollars", "euros", "pounds sterling", "Singapore dollars"]),
    )
    text = rng.choice(LEGAL_TEMPLATES[label]).format(**fields)
    text = text[0].upper() + text[1:]
    num = rng.choice(LEGAL_NUMBERING).format(a=rng.randint(2, 24), b=rng.randint(1, 9), c=rng.choice("abcdefgh"))
    return num + text


# --------------------------------------------------------------------------
# financial: bank transaction category (prompt/completion format)
# --------------------------------------------------------------------------

FIN_LABELS = ["groceries", "travel", "utilities", "salary"]
FIN_PROMPT = (
    "Categorize this bank transaction. "
    "Answer with one word: groceries, travel, utilities or salary.\n\n"
    "Transaction: {tx}"
)

FIN_MERCHANTS = {
    "groceries": [
        "GREENLEAF MARKET",
        "FRESHWAY FOODS",
        "HARVEST BASKET GROCERY",
        "CORNERSTONE SUPERMARKET",
        "VALLEY FARM STORES",
        "DAILY PANTRY",
        "MAPLE & OAK GROCERS",
        "SUNRISE FRESH MARKET",
        "PRICEWISE SUPERMARKETS",
        "ORCHARD LANE FOOD HALL",
        "QUICKCART MINI MART",
        "GOLDEN GRAIN BAKERY & DELI",
        "NORTHFIELD ORGANIC GROCER",
        "BUDGETBASKET DISCOUNT FOODS",
    ],
    "travel": [
        "SKYLARK AIRWAYS",
        "BLUEJET AIR",
        "NORTHSTAR RAIL",
        "HARBOURVIEW HOTEL",
        "CITYHOP TAXI",
        "ROAMSTAY LODGINGS",
        "TRAILWAY COACHES",
        "AIRPORT PARKING T2",
        "GLOBETROT TRAVEL AGENCY",
        "SEABREEZE FERRIES",
        "DRIVEAWAY CAR RENTAL",
        "METRO TRANSIT FARES",
        "PINECREST INN & SUITES",
        "AEROLINK BOOKINGS",
    ],
    "utilities": [
        "CITY WATER DEPT",
        "BRIGHTGRID ELECTRIC",
        "NORTHGAS ENERGY",
        "FIBRENET BROADBAND",
        "RIVERSIDE SEWER & REFUSE",
        "VOLTA POWER CO",
        "HEATWELL DISTRICT HEATING",
        "CONNECTA TELECOM",
        "CLEARSTREAM WATER",
        "SUNFIELD SOLAR ENERGY",
        "METROGAS SUPPLY",
        "LINKUP HOME INTERNET",
    ],
    "salary": [
        "KESTREL DYNAMICS",
        "HOLLOWAY & PINE LLP",
        "BRAMBLE HEALTH TRUST",
        "ORION FREIGHT INC",
        "LAKESIDE SCHOOL DISTRICT",
        "TANGENT SOFTWARE GMBH",
        "MERIDIAN FOODS PLC",
        "COPPERLINE MINING",
        "CITY OF ASHFORD",
        "BLUEJAY AVIATION SERVICES",
        "WILLOWBROOK COUNTY COUNCIL",
        "QUARTZ LABS LTD",
    ],
}
FIN_TOWNS = [
    "ASHFORD",
    "BRENTMOOR",
    "CALDER BAY",
    "DUNMORE",
    "ELMSTEAD",
    "FENWICK",
    "GLENHAVEN",
    "HOLTBY",
    "IRONBRIDGE",
    "KESWOLD",
]
FIN_AMOUNT_RANGE = {"groceries": (4, 190), "travel": (3, 1400), "utilities": (18, 320), "salary": (1650, 7800)}
# plausible per-merchant ranges for travel (fares, taxis and hotels differ a lot)
FIN_TRAVEL_RANGE = {
    "SKYLARK AIRWAYS": (60, 1400),
    "BLUEJET AIR": (45, 900),
    "NORTHSTAR RAIL": (12, 240),
    "HARBOURVIEW HOTEL": (90, 780),
    "CITYHOP TAXI": (7, 85),
    "ROAMSTAY LODGINGS": (70, 650),
    "TRAILWAY COACHES": (9, 120),
    "AIRPORT PARKING T2": (12, 160),
    "GLOBETROT TRAVEL AGENCY": (150, 1400),
    "SEABREEZE FERRIES": (18, 320),
    "DRIVEAWAY CAR RENTAL": (45, 600),
    "METRO TRANSIT FARES": (3, 60),
    "PINECREST INN & SUITES": (80, 540),
    "AEROLINK BOOKINGS": (55, 1200),
}
FIN_TEMPLATES = {
    "groceries": [
        "CARD PURCHASE {date} {merchant} {town} -{amt}",
        "POS DEBIT {merchant} #{store} {date} {amt} DR",
        "{date} CONTACTLESS {merchant} {town} {cur} -{amt}",
        "DEBIT CARD {merchant} STORE {store} {date} -{amt}",
        "{date} VISA {merchant} {town} {amt}",
    ],
    "travel": [
        "CARD PURCHASE {date} {merchant} {town} -{amt}",
        "{date} VISA {merchant} BOOKING REF {ref} -{amt}",
        "POS DEBIT {merchant} {date} {amt} DR",
        "{date} CONTACTLESS {merchant} {town} {cur} -{amt}",
        "ONLINE PAYMENT {merchant} TICKET {ref} {date} -{amt}",
    ],
    "utilities": [
        "DIRECT DEBIT {merchant} ACCT {ref} {date} -{amt}",
        "{date} AUTOPAY {merchant} BILL {month} -{amt}",
        "ONLINE BILL PMT {merchant} REF {ref} {amt} DR",
        "STANDING ORDER {merchant} CUST NO {ref} {date} -{amt}",
        "{date} DD {merchant} {month} STATEMENT {cur} -{amt}",
    ],
    "salary": [
        "ACH CREDIT {merchant} PAYROLL {date} +{amt}",
        "{date} DIRECT DEP {merchant} SALARY {month} {amt} CR",
        "BANK TRANSFER IN FROM {merchant} WAGES {month} +{amt}",
        "{date} CREDIT {merchant} PAY RUN {ref} {cur} +{amt}",
        "SALARY {month} {merchant} EMPLOYEE ID {ref} +{amt}",
    ],
}
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def fin_date(rng):
    mon = rng.randint(1, 12)
    day = rng.randint(1, 28)
    style = rng.randrange(3)
    if style == 0:
        return f"{mon:02d}/{day:02d}"
    if style == 1:
        return f"{day:02d} {MONTHS[mon - 1]}"
    return f"2024-{mon:02d}-{day:02d}"


def make_financial(rng, label):
    merchant = rng.choice(FIN_MERCHANTS[label])
    lo, hi = FIN_TRAVEL_RANGE.get(merchant, FIN_AMOUNT_RANGE[label])
    amount = rng.randint(lo * 100, hi * 100) / 100
    fields = dict(
        merchant=merchant,
        town=rng.choice(FIN_TOWNS),
        date=fin_date(rng),
        amt=f"{amount:,.2f}",
        store=rng.randint(100, 9999),
        ref=f"{rng.randint(100000, 999999)}",
        month=rng.choice(MONTHS),
        cur=rng.choice(["USD", "EUR", "GBP"]),
    )
    return rng.choice(FIN_TEMPLATES[label]).format(**fields)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def main():
    # medical: eval 14/13/13 -> give the extra eval item to "urgent"
    rng = random.Random(SEED + 1)
    train, evl = build_splits(rng, MED_LABELS, make_medical, eval_extra_order=["urgent", "emergency", "routine"])

    def to_chat(s, lab):
        return {
            "messages": [
                {"role": "user", "content": MED_PROMPT.format(situation=s)},
                {"role": "assistant", "content": lab},
            ]
        }

    write_jsonl(OUT_DIR / "medical" / "train.jsonl", [to_chat(s, l) for s, l in train])
    write_jsonl(OUT_DIR / "medical" / "eval.jsonl", [to_chat(s, l) for s, l in evl])

    rng = random.Random(SEED + 2)
    train, evl = build_splits(rng, LEGAL_LABELS, make_legal)

    def to_alpaca(s, lab):
        return {"instruction": LEGAL_INSTRUCTION, "input": s, "output": lab}

    write_jsonl(OUT_DIR / "legal" / "train.jsonl", [to_alpaca(s, l) for s, l in train])
    write_jsonl(OUT_DIR / "legal" / "eval.jsonl", [to_alpaca(s, l) for s, l in evl])

    rng = random.Random(SEED + 3)
    train, evl = build_splits(rng, FIN_LABELS, make_financial)

    def to_pc(s, lab):
        return {"prompt": FIN_PROMPT.format(tx=s), "completion": lab}

    write_jsonl(OUT_DIR / "financial" / "train.jsonl", [to_pc(s, l) for s, l in train])
    write_jsonl(OUT_DIR / "financial" / "eval.jsonl", [to_pc(s, l) for s, l in evl])

    for dom in ("medical", "legal", "financial"):
        for split in ("train", "eval"):
            p = OUT_DIR / dom / f"{split}.jsonl"
            n = sum(1 for _ in open(p, encoding="utf-8"))
            print(f"wrote {p.relative_to(OUT_DIR.parent.parent)} ({n} records)")


if __name__ == "__main__":
    main()
