"""moemerge's vLLM plugin, the parts that run without vLLM (the serving itself is .ci/vllm_check.sh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moemerge.serve.vllm_configs import MAPPED_CONFIGS
from moemerge.serve.vllm_plugin import MAPPED_ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_names_register() -> None:
    """vLLM finds the plugin only through this entry point group; it must name an existing function."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["vllm.general_plugins"]["moemerge_mapped"]
    module, func = target.split(":")
    assert (module, func) == ("moemerge.serve.vllm_plugin", "register")


def test_plugin_import_is_cheap() -> None:
    """vLLM imports every plugin in every process: the module itself must not pull in torch or transformers."""
    code = ("import sys, moemerge.serve.vllm_plugin; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_architectures_match_the_saved_config() -> None:
    """Every model type the plugin serves is one --format mapped writes, under the same architecture name (more
    families may be written than vLLM serves: those are listed as limits in docs/formats.md)."""
    from moemerge.save.remote.modeling_moemerge import MAPPED_SUFFIX, mapped_classes
    from moemerge.save.remote.registered import mapped_model_types

    for cls, arch in zip(MAPPED_CONFIGS, MAPPED_ARCHITECTURES):
        base = cls.model_type.removesuffix(MAPPED_SUFFIX)
        assert base in mapped_model_types()
        config_cls, model_cls = mapped_classes(base)  # what --format mapped writes for that family
        assert (config_cls.model_type, model_cls.__name__) == (cls.model_type, arch)
    assert all(target.startswith("moemerge.serve.vllm_models:") for target in MAPPED_ARCHITECTURES.values())


def test_config_reads_expert_map() -> None:
    """The renamed stock config keeps expert_map as an attribute (here under moemerge's own transformers)."""
    from transformers import PretrainedConfig

    for cls in MAPPED_CONFIGS:
        config = cls(expert_map={"1": [0, 0, 1, 1]}, num_hidden_layers=2)
        assert isinstance(config, PretrainedConfig)
        assert config.expert_map == {"1": [0, 0, 1, 1]}
        assert cls.from_dict(config.to_dict()).expert_map == {"1": [0, 0, 1, 1]}
