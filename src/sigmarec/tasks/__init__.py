"""Multi-task instruction data (SIGMA part 3): the seven task definitions, SFT samples,
per-task evaluation instances and the chat prompt they render to."""

from sigmarec.tasks.config import TASK_NAMES, HolidayWindow, TasksConfig
from sigmarec.tasks.definitions import SOFT_TOKEN, TASK_CLASSES, Cut, Task
from sigmarec.tasks.prompt_style import PromptStyle, load_prompt_style
from sigmarec.tasks.registry import build_tasks, get_task_class, match_instruction, task_names
from sigmarec.tasks.resources import TaskResources, build_resources
from sigmarec.tasks.sft_data import (
    RenderedPrompt,
    SFTData,
    build_sft_data,
    decode_sample,
    render_prompt,
)

__all__ = [
    "SOFT_TOKEN", "TASK_CLASSES", "TASK_NAMES", "Cut", "HolidayWindow", "PromptStyle",
    "RenderedPrompt", "SFTData", "Task", "TaskResources", "TasksConfig", "build_resources",
    "build_sft_data", "build_tasks", "decode_sample", "get_task_class", "load_prompt_style",
    "match_instruction", "render_prompt", "task_names",
]
