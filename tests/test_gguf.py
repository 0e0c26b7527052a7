"""GGUF files written here with the `gguf` package from tiny random transformers models, loaded
by jaxllm and by transformers (its own GGUF loader) and compared: tokenizer, template, logits."""

import json
import random

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_models
import jaxllm
from jaxllm import quantize
from jaxllm.config import ConfigError
from jaxllm.gguf_checkpoint import GGUFFile, is_gguf_file
from jaxllm.hf_checkpoint import CheckpointError
from jaxllm.params import named_params

Q = gguf.GGMLQuantizationType
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "return", "import",
    "你好", "世界", "日本語", "😀", "café", "naïve", "3.14159", "42", "\n", "    ",
]  # fmt: skip
TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n",
    "the quick brown fox jumps over the lazy dog",
    "emoji 😀👍🏽 and 🦜",
    "中文字符和日本語のテキスト",
    "café naïve Ünïcödé",
    "numbers 1234567890 and 3.14159",
    "mixed你好world😀!",
    "a  b   c\n\n",
    "<|im_start|>user\nhi<|im_end|>",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief. 简洁"}, {"role": "user", "content": "2+2? 😀"}]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]


def corpus(seed=0, n=800):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def byte_level_vocab():
    """A small byte-level BPE (Qwen2's split rule): tokens, types, merges, special ids."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    split = tokenizers.Regex(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(split, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(corpus(), trainer=trainer)
    tk.add_special_tokens(SPECIALS)
    model = json.loads(tk.to_str())
    vocab = model["model"]["vocab"] | {t["content"]: t["id"] for t in model["added_tokens"]}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    ids = {t: tokens.index(t) for t in SPECIALS}
    return dict(tokens=tokens, types=types, merges=merges, ids=ids)


def sentencepiece_vocab(tmp_path):
    """A small Llama-2-style SentencePiece BPE (byte fallback): tokens, scores, types."""
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(seed=1)))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=360,
        model_type="bpe", byte_fallback=True, character_coverage=0.995, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )  # fmt: skip
    proto = sp_model.ModelProto()
    proto.ParseFromString((tmp_path / "sp.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    return dict(
        tokens=tokens,
        scores=[p.score for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        ids={"<unk>": 0, "<s>": 1, "</s>": 2},
    )


def llama3_rope_factors(cfg):
    """llama.cpp's rope_freqs tensor for Llama 3.1 rope scaling: each pair's divisor."""
    rope = cfg.rope_parameters
    H = cfg.head_dim
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, H, 2) / H)
    wavelen = 2 * np.pi / inv_freq
    old, low, high = (
        rope["original_max_position_embeddings"],
        rope["low_freq_factor"],
        rope["high_freq_factor"],
    )
    smooth = np.clip((old / wavelen - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / rope["factor"] + smooth)).astype(np.float32)


def write_gguf(path, model, arch, vocab, qtype=Q.F32, add_bos=None):
    """What llama.cpp's convert_hf_to_gguf.py writes for ``model``: metadata, then every tensor
    under its GGUF name (Q/K rows permuted for "llama"), 2-D weights quantized to ``qtype``."""
    cfg = model.config
    D, N, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    H = getattr(cfg, "head_dim", None) or D // N
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(D)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_key_length(H)
    w.add_value_length(H)
    w.add_rope_dimension_count(H)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # Gemma: by layer type
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    ids = vocab["ids"]
    if "merges" in vocab:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(ids["<|begin_of_text|>"])
        w.add_eos_token_id(ids["<|end_of_text|>"])
        w.add_eot_token_id(ids["<|im_end|>"])
    else:
        w.add_tokenizer_model("llama")
        w.add_token_scores(vocab["scores"])
        w.add_unk_token_id(ids["<unk>"])
        w.add_bos_token_id(ids["<s>"])
        w.add_eos_token_id(ids["</s>"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.num_hidden_layers
    )
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = N if ".q_proj." in hf_name else K
            data = data.reshape(heads, 2, -1, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp multiplies by the weight; Gemma by 1 + weight
        if data.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    return {"bpe": byte_level_vocab(), "spm": sentencepiece_vocab(tmp_path_factory.mktemp("sp"))}


# name -> (hf_models variant, GGUF architecture, vocabulary, quantization, config overrides)
FILES = {
    "llama_f32": ("llama3_gqa", "llama", "spm", Q.F32, {}),
    "qwen2_f32": ("qwen2_bias", "qwen2", "bpe", Q.F32, {}),
    "llama_tied_q8": ("llama_tied", "llama", "bpe", Q.Q8_0, {}),
    "qwen2_q4_0": ("qwen2_bias", "qwen2", "bpe", Q.Q4_0, {}),
    "llama_q4_1": ("llama3_gqa", "llama", "spm", Q.Q4_1, {}),
    # transformers' GGUF loader ignores qwen3.attention.key_length and takes Qwen3Config's
    # default head_dim, 128; other head sizes are checked against the source model below.
    "qwen3_q8": ("qwen3", "qwen3", "bpe", Q.Q8_0, {"head_dim": 128}),
    "qwen3_head_dim": ("qwen3", "qwen3", "bpe", Q.Q4_0, {}),
}
# Llama 3.1's rope scaling, with a band of blended frequencies wide enough for head_dim 16.
LLAMA31_ROPE = dict(
    hf_models.LLAMA3_ROPE,
    rope_theta=10000.0,
    original_max_position_embeddings=64,
    high_freq_factor=32.0,
)
# Gemma 3 as llama.cpp defines it (a window on five layers of six, local rope base 10k, query
# scale 1/sqrt(head_dim)) and transformers' GGUF loader defaults it (query_pre_attn_scalar 256):
# head_dim 256 makes the two agree; 6 layers, one of them global; a window shorter than the input.
FILES["gemma3_q8"] = (
    "gemma3",
    "gemma3",
    "bpe",
    Q.Q8_0,
    dict(
        num_hidden_layers=6,
        head_dim=256,
        query_pre_attn_scalar=256,
        layer_types=None,
        rope_parameters=None,
        sliding_window=16,
    ),
)
# Heads 32 wide, so that the blocks of 32 fit every layer's inputs: kept packed when loaded.
for _qtype in (Q.Q4_0, Q.Q8_0):
    FILES[f"llama_{_qtype.name.lower()}_h32"] = (
        "llama3_gqa",
        "llama",
        "bpe",
        _qtype,
        {"num_attention_heads": 2, "num_key_value_heads": 1},
    )
FILES["llama31_rope"] = (
    "llama31_rope_scaling",
    "llama",
    "bpe",
    Q.F32,
    {"rope_scaling": LLAMA31_ROPE},
)


@pytest.fixture(scope="module")
def files(tmp_path_factory, vocabs):
    """name -> path of a GGUF file, written on first use."""
    folder = tmp_path_factory.mktemp("gguf")
    made = {}

    def get(name):
        if name not in made:
            variant, arch, kind, qtype, extra = FILES[name]
            vocab = vocabs[kind]
            special = {"bos_token_id": 1, "eos_token_id": 2}
            if kind == "bpe":
                special = {
                    "bos_token_id": vocab["ids"]["<|begin_of_text|>"],
                    "eos_token_id": vocab["ids"]["<|end_of_text|>"],
                }
            overrides = dict(vocab_size=len(vocab["tokens"]), **special, **extra)
            model = hf_models.build(variant, **overrides)
            made[name] = write_gguf(folder / f"{name}.gguf", model, arch, vocab, qtype), model
        return made[name][0]

    get.model = lambda name: (get(name), made[name][1])[1]

    return get


def reference_model(path):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("name", ["llama_f32", "qwen2_f32"])
def test_tokenizer_and_template_match_transformers(files, name):
    path = files(name)
    ours = GGUFFile(path).tokenizer()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert ours.bos_id == ref.bos_token_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    rendered = ours.apply_chat_template(MESSAGES, add_generation_prompt=True)
    expected = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert rendered == expected


def test_gemma3_config_from_metadata(files):
    cfg = GGUFFile(files("gemma3_q8")).config()
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.norm_plus_one and cfg.tie_word_embeddings
    assert cfg.sliding_windows == (16, 16, 16, 16, 16, None)
    assert (cfg.local_rope_theta, cfg.query_pre_attn_scalar) == (10_000.0, 256)
    assert cfg.mlp_activation == "gelu_tanh" and cfg.qk_norm and cfg.sandwich_norms


def test_config_from_metadata(files, vocabs):
    cfg = GGUFFile(files("llama_tied_q8")).config()
    assert cfg.architecture == "LlamaForCausalLM" and cfg.tie_word_embeddings
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (2, 64, 4, 1)
    cfg = GGUFFile(files("qwen2_f32")).config()
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias
    assert not cfg.tie_word_embeddings and cfg.vocab_size == len(vocabs["bpe"]["tokens"])
    assert is_gguf_file(files("qwen2_f32")) and not is_gguf_file(files("qwen2_f32").parent)


def test_llama3_rope_scaling_from_rope_freqs(files):
    """llama.cpp keeps Llama 3.1's rope scaling only as a tensor of per-pair divisors; the
    config is recovered from it."""
    cfg = GGUFFile(files("llama31_rope")).config()
    assert cfg.rope_scaling.factor == 8.0
    assert cfg.rope_scaling.high_freq_factor / cfg.rope_scaling.low_freq_factor == 32.0


# Files transformers' GGUF loader reads wrong (it ignores rope_freqs, and qwen3's key_length):
# compared with the Hugging Face model each was written from, dequantized the same way.
@pytest.mark.parametrize("name", ["llama31_rope", "qwen3_head_dim"])
def test_logits_match_the_source_model(files, name):
    path = files(name)
    source = files.model(name)
    if FILES[name][3] != Q.F32:  # the weights as the file rounded them
        with torch.no_grad():
            for p in source.parameters():
                if p.ndim == 2:
                    quant = gguf.quants.quantize(p.numpy(), FILES[name][3])
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(quant, FILES[name][3])))
    llm = jaxllm.LLM.load(path, warm_up=False, start=False, max_seq_len=64, max_num_seqs=2)
    ids = np.random.default_rng(1).integers(0, llm.config.vocab_size, size=60).tolist()
    expected = hf_models.torch_logits(source, [ids]).numpy()[0]
    assert np.abs(llm.logits(ids) - expected).max() <= 1e-4


@pytest.mark.parametrize("name", [n for n in FILES if n not in ("llama31_rope", "qwen3_head_dim")])
def test_logits_match_transformers(files, name):
    path = files(name)
    ref = reference_model(path)
    llm = jaxllm.LLM.load(path, warm_up=False, start=False, max_seq_len=64, max_num_seqs=2)
    ids = np.random.default_rng(0).integers(0, llm.config.vocab_size, size=40).tolist()
    expected = hf_models.torch_logits(ref, [ids]).numpy()[0]
    assert np.abs(llm.logits(ids) - expected).max() <= 1e-4


def test_q8_0_runs_as_int8(files):
    path = files("llama_tied_q8")
    ids = list(range(3, 43))
    expected = hf_models.torch_logits(reference_model(path), [ids]).numpy()[0]
    llm = jaxllm.LLM.load(
        path, quantize="int8", warm_up=False, start=False, max_seq_len=64, max_num_seqs=2
    )
    assert llm.runner.spec.quantized == "int8"
    # Per-channel int8 rounding on top of Q8_0's per-block rounding: a few percent.
    assert np.abs(llm.logits(ids) - expected).max() <= 0.05 * np.abs(expected).max()


@pytest.mark.parametrize(
    "name, method, dtype",
    [("llama_q4_0_h32", "int4", "uint8"), ("llama_q8_0_h32", "int8-g32", "int8")],
)
def test_q4_0_and_q8_0_blocks_load_packed_equal_to_ggufs_dequantization(files, name, method, dtype):
    path = files(name)
    llm = jaxllm.LLM.load(
        path, quantize=method, warm_up=False, start=False, max_seq_len=64, max_num_seqs=2
    )
    file = GGUFFile(path)
    layout = file.layout(llm.config.stored)
    params = named_params(llm.runner.state)
    # Q/K rows are permuted by llama.cpp (undone here), wo's input axis is split into heads.
    for weight in (
        "layers.0.attn.wq",
        "layers.0.attn.wk",
        "layers.1.attn.wo",
        "layers.0.mlp.w_down",
    ):
        q, scale = params[weight].value(), params[quantize.scale_name(weight)].value()
        assert q.dtype == dtype
        stored = layout[weight]
        want = file.read(weight, stored).reshape(stored.view).transpose(stored.perm)
        np.testing.assert_array_equal(np.asarray(quantize.dequantize(q, scale)), want)
    ids = list(range(3, 43))
    expected = hf_models.torch_logits(reference_model(path), [ids]).numpy()[0]
    # transformers runs the dequantized file; the CPU kernel rounds activations to int8.
    assert np.abs(llm.logits(ids) - expected).max() <= 0.05 * np.abs(expected).max()


def test_generates_through_the_engine(files):
    path = files("qwen2_f32")
    ref = reference_model(path)
    # Compiled on demand rather than every bucket at start-up: this is about the file.
    with jaxllm.LLM.load(path, warm_up=False, max_seq_len=64, max_num_seqs=2) as llm:
        prompt = llm.tokenizer.encode("the quick brown fox")
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        want = want[0, len(prompt) :].tolist()  # up to an end-of-generation token
        got = llm.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
        assert got.token_ids[: len(want)] == want
        chat = llm.chat(MESSAGES, max_tokens=4, temperature=0)
        assert chat.finish_reason in ("stop", "length")


def test_convert_then_load_gives_the_same_logits(files, tmp_path):
    from serve.cli import main

    path = files("llama_q4_1")
    # float32: the default for a quantized file is bfloat16, which would round the weights.
    assert main(["convert", str(path), str(tmp_path / "ckpt"), "--dtype", "float32"]) == 0
    options = dict(warm_up=False, start=False, max_seq_len=64, max_num_seqs=2)
    direct = jaxllm.LLM.load(path, **options)
    converted = jaxllm.LLM.load(tmp_path / "ckpt", **options)
    ids = list(range(5, 45))
    assert np.abs(direct.logits(ids) - converted.logits(ids)).max() <= 1e-5
    for text in TEXTS:
        assert converted.tokenizer.encode(text) == direct.tokenizer.encode(text)
    messages = MESSAGES
    assert converted.tokenizer.apply_chat_template(
        messages
    ) == direct.tokenizer.apply_chat_template(messages)
    assert converted.tokenizer.eos_ids == direct.tokenizer.eos_ids


def test_unknown_architecture_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="'mamba' is not supported"):
        GGUFFile(tmp_path / "x.gguf").config()


def test_unsupported_tensor_type_is_refused(files, tmp_path, vocabs):
    model = hf_models.build("qwen2_bias", vocab_size=len(vocabs["bpe"]["tokens"]))
    path = write_gguf(tmp_path / "q.gguf", model, "qwen2", vocabs["bpe"])
    # Relabel one weight as IQ4_NL in place: the loader must refuse it before reading data.
    file = GGUFFile(path)
    assert file.tensors["blk.0.ffn_up.weight"].tensor_type == Q.F32
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    tensor.field.parts[4][0] = Q.IQ4_NL  # ggml type, the part after the dimensions
    del reader
    with pytest.raises(CheckpointError, match="IQ4_NL"):
        GGUFFile(path).layout(GGUFFile(path).config())
