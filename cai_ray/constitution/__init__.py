"""Constitutions: the written principles that drive critique/revision and AI feedback (paper §3-§4).

Load one with `load_constitution(path)`; every stage records its `content_hash`.
"""

from cai_ray.constitution.diff import ConstitutionDiff, diff_constitutions
from cai_ray.constitution.importers import detect_format, import_constitution
from cai_ray.constitution.loader import (
    DEFAULT_CONSTITUTION,
    constitution_from_dict,
    dump_constitution,
    load_constitution,
    parse_constitution,
    to_yaml,
)
from cai_ray.constitution.render import (
    ANSWER_PREFIX,
    COT_ANSWER_PREFIX,
    COT_PREFIX,
    cot_turns,
    render_multiple_choice,
    render_turns,
)
from cai_ray.constitution.sampling import PrincipleSampler, choose_principles
from cai_ray.constitution.schema import (
    Constitution,
    CotExample,
    CritiqueExample,
    CritiquePrinciple,
    CritiqueRound,
    FeedbackExample,
    FeedbackPrinciple,
    Turn,
)
from cai_ray.errors import ConstitutionError

__all__ = [
    "ANSWER_PREFIX",
    "COT_ANSWER_PREFIX",
    "COT_PREFIX",
    "DEFAULT_CONSTITUTION",
    "Constitution",
    "ConstitutionDiff",
    "ConstitutionError",
    "CotExample",
    "CritiqueExample",
    "CritiquePrinciple",
    "CritiqueRound",
    "FeedbackExample",
    "FeedbackPrinciple",
    "PrincipleSampler",
    "Turn",
    "choose_principles",
    "constitution_from_dict",
    "cot_turns",
    "detect_format",
    "diff_constitutions",
    "dump_constitution",
    "import_constitution",
    "load_constitution",
    "parse_constitution",
    "render_multiple_choice",
    "render_turns",
    "to_yaml",
]
