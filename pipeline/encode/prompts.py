"""The 32 prompt templates of the paper's appendix (6.2), as the released recipe lists them.

Each class name is written into every template; the text encoder embeds each
sentence, each embedding is L2-normalised, the 32 are averaged and the mean is
normalised again (:func:`pipeline.encoders.TextEncoder.encode_names`).
"""

from __future__ import annotations

TEMPLATES: tuple[str, ...] = (
    'a bad photo of the {}.',
    'a photo of the large {}.',
    'a photo of the small {}.',
    'a cropped photo of a {}.',
    'This is a photo of a {}',
    'This is a photo of a small {}',
    'This is a photo of a medium {}',
    'This is a photo of a large {}',
    'This is a masked photo of a {}',
    'This is a masked photo of a small {}',
    'This is a masked photo of a medium {}',
    'This is a masked photo of a large {}',
    'This is a cropped photo of a {}',
    'This is a cropped photo of a small {}',
    'This is a cropped photo of a medium {}',
    'This is a cropped photo of a large {}',
    'A photo of a {} in the scene',
    'a bad photo of the {} in the scene',
    'a photo of the large {} in the scene',
    'a photo of the small {} in the scene',
    'a cropped photo of a {} in the scene',
    'a photo of a masked {} in the scene',
    'There is a {} in the scene',
    'There is the {} in the scene',
    'This is a {} in the scene',
    'This is the {} in the scene',
    'This is one {} in the scene',
    'There is a masked {} in the scene',
    'There is the masked {} in the scene',
    'This is a masked {} in the scene',
    'This is the masked {} in the scene',
    'This is one masked {} in the scene',
)

assert len(TEMPLATES) == 32


def fill(templates: tuple[str, ...] | list[str], name: str) -> list[str]:
    """Every template with ``name`` written in."""
    return [t.format(name) for t in templates]
