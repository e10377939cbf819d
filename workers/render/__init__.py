"""Key-image rendering: a stable study becomes a small, ordered set of PNG key images.

Pure functions over index rows and files (no Celery, no database)::

    instances = instances_from_files(paths)          # or instance_input() over index rows
    rendered = render_study(instances, RenderSettings())
    write_render_output(rendered, out_dir)
"""

from .errors import NothingRenderable, RulesError, SeriesRenderError
from .inputs import instance_input, instances_from_files
from .model import InstanceInput, InstanceList, KeyImage, RenderedStudy, SeriesDecision
from .output import render_files, write_render_output
from .rules import load_rules
from .study import render_study

__all__ = [
    "InstanceInput",
    "InstanceList",
    "KeyImage",
    "NothingRenderable",
    "RenderedStudy",
    "RulesError",
    "SeriesDecision",
    "SeriesRenderError",
    "instance_input",
    "instances_from_files",
    "load_rules",
    "render_files",
    "render_study",
    "write_render_output",
]
