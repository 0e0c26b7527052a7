"""Hostile input to the entry points that are not network ones: YAML serve config files,
``jaxllm serve`` flags (parsing and config validation; no server starts) and the notebook
API's ``LLM.generate``. The property: success, or ValueError / TypeError (argparse: exit 2)
with a message, never another exception or a hang.
"""

from __future__ import annotations

import contextlib
import io

import fuzz_strategies as fz
import jax
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import jaxllm
from serve import cli
from serve.config import ServeConfig
from server_process import write_model
from sharding import make_mesh

_FIELDS = sorted(f for f in ServeConfig.__dataclass_fields__ if f != "model")
_ENGINE_FIELDS = ["max_num_seqs", "max_seq_len", "max_step_tokens", "page_size", "x"]
_YAML_VALUES = fz.JSON_SCALARS | st.floats() | st.lists(fz.JSON_SCALARS, max_size=3)


@st.composite
def _config_texts(draw) -> str:
    if draw(st.integers(0, 9)) == 0:  # not a mapping, or not YAML at all
        return draw(
            fz.TEXT | st.sampled_from(["[1, 2]", "{a: [", "- x", "!!python/object:os.system"])
        )
    data = {
        name: draw(_YAML_VALUES) for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=5))
    }
    if draw(st.booleans()):
        engine = draw(st.lists(st.sampled_from(_ENGINE_FIELDS), max_size=3))
        data["engine"] = {name: draw(_YAML_VALUES) for name in engine}
    return yaml.safe_dump(data)


def test_fuzzed_config_files_load_or_say_what_is_wrong(tmp_path):
    path = tmp_path / "serve.yaml"
    outcomes = {"ok": 0, "refused": 0}

    @fz.fuzz_settings()
    @given(_config_texts())
    def check(text):
        path.write_text(text)
        try:
            ServeConfig.from_yaml(path)
            outcomes["ok"] += 1
        except (ValueError, TypeError) as e:
            assert str(e), text
            outcomes["refused"] += 1

    check()
    assert outcomes["ok"] and outcomes["refused"], outcomes


_FLAGS = ["--port", "--http-port", "--metrics-port", "--max-queue", "--max-num-seqs",
          "--max-seq-len", "--page-size", "--stream-interval", "--drain-timeout-s", "--mesh",
          "--host", "--tls-cert", "--api-key", "--peer-timeout-s", "--speculative",
          "--num-speculative-tokens", "--process-id", "--num-processes"]  # fmt: skip
_FLAG_VALUES = (
    st.integers(-(2**40), 2**40).map(str)
    | fz.TEXT
    | st.sampled_from(["nan", "inf", "-1", "0", "1", "65536", "data=2,tensor=4", "ngram", ""])
)


def test_fuzzed_serve_flags_parse_or_exit_2():
    outcomes = {"ok": 0, "refused": 0}
    parser = cli.build_parser()

    @fz.fuzz_settings()
    @given(st.lists(st.tuples(st.sampled_from(_FLAGS), _FLAG_VALUES), max_size=4))
    def check(pairs):
        argv = ["serve", *[part for flag, value in pairs for part in (flag, value)]]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args = parser.parse_args(argv)
            cli.serve_config(args)
            outcomes["ok"] += 1
        except SystemExit as e:
            assert e.code == 2, argv
            outcomes["refused"] += 1
        except (ValueError, TypeError) as e:
            assert str(e), argv
            outcomes["refused"] += 1

    check()
    assert outcomes["ok"] and outcomes["refused"], outcomes


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model = write_model(tmp_path_factory.mktemp("fuzz_llm"))
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    with jaxllm.LLM.load(model, mesh=mesh, max_num_seqs=4, max_seq_len=64, warm_up=False) as m:
        yield m


_PROMPTS = (
    fz.SMALL_TEXT
    | st.lists(st.integers(0, fz.VOCAB - 1), min_size=1, max_size=6)
    | st.just("")
    | st.lists(fz.INT32, max_size=4)
    | st.lists(fz.SMALL_TEXT, min_size=1, max_size=2)
    | fz.JSON
)
_KWARGS = {
    "max_tokens": st.integers(1, 2) | fz.INT32 | fz.JSON,
    "temperature": st.floats(0, 2) | st.floats() | fz.JSON,
    "top_p": st.floats(0.1, 1) | st.floats() | fz.JSON,
    "top_k": st.integers(-2, 50) | fz.JSON,
    "min_p": st.floats() | fz.JSON,
    "seed": st.integers(-(2**70), 2**70) | fz.JSON,
    "stop": st.lists(fz.SMALL_TEXT, max_size=2) | fz.SMALL_TEXT | fz.MANY_STRINGS | fz.JSON,
    "stop_token_ids": st.lists(fz.INT32, max_size=3) | fz.JSON,
    "ignore_eos": st.booleans() | fz.JSON,
    "logprobs": st.integers(-1, 25) | fz.JSON,
    "n": st.integers(-1, 3) | fz.JSON,
    "bogus": fz.JSON,
}


def test_fuzzed_generate_arguments_of_the_notebook_api(llm):
    outcomes = {"ok": 0, "refused": 0}

    @fz.fuzz_settings()
    @given(
        _PROMPTS,
        st.dictionaries(st.sampled_from(sorted(_KWARGS)), st.none(), max_size=4),
        st.data(),
    )
    def check(prompt, names, data):
        kwargs = {"max_tokens": 2, **{k: data.draw(_KWARGS[k]) for k in names}}
        if isinstance(kwargs["max_tokens"], int) and kwargs["max_tokens"] > 2:
            kwargs["max_tokens"] = 2  # cheap: wild values are the small or invalid ones
        try:
            llm.generate(prompt, **kwargs)
            outcomes["ok"] += 1
        except (ValueError, TypeError) as e:
            assert str(e), (prompt, kwargs)
            outcomes["refused"] += 1

    check()
    assert outcomes["ok"] and outcomes["refused"], outcomes
    assert llm.generate("still", max_tokens=2, temperature=0).finish_reason == "length"


@pytest.mark.parametrize("text", ["{", "\x1f", "a: [1,"])
def test_a_config_file_that_is_not_yaml_is_a_value_error(tmp_path, text):
    """Regression (found by fuzzing): yaml's own errors reached `jaxllm serve` as tracebacks."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="not valid YAML"):
        ServeConfig.from_yaml(path)
    assert cli.main(["serve", "--config", str(path)]) == 2
