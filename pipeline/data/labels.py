"""The mask convention and class lists: the one home of the ignore value, the split-file class names,
the words a text encoder sees for them, and the names of training splits."""

from __future__ import annotations

IGNORE = 255
MAX_CLASSES = 254  # values 1..254 fit a uint8 mask beside 0 and the 255 ignore label

# Same names and order as splits/pascal/classes.txt (mask value = position + 1).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# Same names and order as splits/coco/classes.txt: the COCO category order with
# spaces removed and four VOC-style names (see _COCO_ALIASES).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "trafficlight", "firehydrant", "stopsign", "parkingmeter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sportsball", "kite",
    "baseballbat", "baseballglove", "skateboard", "surfboard", "tennisracket", "bottle",
    "wineglass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hotdog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote",
    "keyboard", "cellphone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddybear", "hairdrier", "toothbrush",
)
# Official COCO category names whose split-file name is not simply the name without spaces.
_COCO_ALIASES = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa", "tv": "tvmonitor"}
# Split files fuse words ("diningtable"); text encoders were trained on natural words.
_PROMPT_NAMES = {
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
    "trafficlight": "traffic light", "firehydrant": "fire hydrant", "stopsign": "stop sign",
    "parkingmeter": "parking meter", "sportsball": "sports ball", "baseballbat": "baseball bat",
    "baseballglove": "baseball glove", "tennisracket": "tennis racket", "wineglass": "wine glass",
    "hotdog": "hot dog", "cellphone": "cell phone", "teddybear": "teddy bear",
    "hairdrier": "hair drier",
}


def prompt_name(name: str) -> str:
    """The words a text encoder should see for a split-file class name."""
    return _PROMPT_NAMES.get(name, name.replace("_", " "))


# Which words the text encoder sees: the split files' raw names ("diningtable", as the released
# code feeds them) or natural words ("dining table"). "auto": raw for the paper's readers.
CLASS_WORDS = ("auto", "raw", "natural")
_RAW_NAME_READERS = {"voc", "pascal", "coco", "coco2014"}


def resolve_class_words(choice: str, *, dataset: str | None) -> str:
    if choice not in CLASS_WORDS:
        from pipeline.errors import UserError

        raise UserError(f"class words must be one of {', '.join(CLASS_WORDS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "raw" if dataset in _RAW_NAME_READERS else "natural"


def text_words(name: str, class_words: str) -> str:
    """What the text encoder reads for a class name under a resolved ``class_words`` choice."""
    return name if class_words == "raw" else prompt_name(name)


def coco_class_name(category: str) -> str:
    """Split-file name of an official COCO category name ("dining table" -> "diningtable")."""
    return _COCO_ALIASES.get(category, category.replace(" ", ""))

TRAIN_SPLITS = {"train", "trn", "training"}


def parse_names(text: str) -> list[str]:
    """Class names typed as one comma-separated string ("cat, potted plant") as a list; blanks dropped.

    Names are kept verbatim otherwise: quotes, apostrophes and other characters are part of the name.
    """
    return [name.strip() for name in str(text).split(",") if name.strip()]
