"""Helpers for the serving tests (no tests here): a random-weight tiny Qwen3-MoE checkpoint
with a small byte-level BPE tokenizer, built in seconds, so the serving tests do not
depend on the embedded trained model."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("The quick brown fox jumps over the lazy dog. import json\nprint(json.dumps({'a': 1}))\n"
        "def add(a, b):\n    return a + b\n") * 20


def standin_config(vocab_size: int = 384):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                          max_position_embeddings=256, rope_theta=10000.0, eos_token_id=0, bos_token_id=0,
                          pad_token_id=0, tie_word_embeddings=False)


def standin_model(seed: int = 0):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(standin_config()).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, a less repetitive random model
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[0] = 0.0  # end of text (id 0) never wins: requests run to max_tokens
    return model


def standin_checkpoint(directory: Path) -> Path:
    """Write config.json, model.safetensors and a tokenizer into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    standin_model().save_pretrained(directory)
    return directory


class LiveServer:
    """``build_app`` + ``build_server`` on a free loopback port in a background thread (a
    real socket and uvicorn's real protocol, the engine inspectable in process)."""

    def __init__(self, directory: Path, *, limits=None, max_len: int = 128, max_batch_size: int = 2,
                 step_delay_s: float = 0.0, served_model: str = "standin") -> None:
        import socket
        import threading
        import time

        from transformers import AutoTokenizer

        import activepath
        from activepath.serving.engine import Engine, EngineConfig
        from activepath.serving.http_guard import HttpLimits, build_server
        from activepath.serving.metrics import ServingMetrics
        from activepath.serving.scheduler import SchedulerConfig
        from activepath.serving.server import build_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        tokenizer = AutoTokenizer.from_pretrained(directory)
        self.metrics = ServingMetrics()
        config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=max_batch_size, max_len=max_len))
        self.engine = Engine(activepath.load(directory), config, stop_ids=[0], metrics=self.metrics)
        if step_delay_s:  # a slower model: every step takes at least this long
            execute = self.engine.runner.execute
            self.engine.runner.execute = lambda plan: (time.sleep(step_delay_s), execute(plan))[1]
        self.limits = limits or HttpLimits()
        app = build_app(self.engine, tokenizer, served_model=served_model, metrics=self.metrics,
                        limits=self.limits)
        self.server = build_server(app, host="127.0.0.1", port=self.port, limits=self.limits,
                                   on_drain=self.engine.shutdown)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def outcome(self, name: str) -> float:
        return self.metrics.registry.get_sample_value("activepath_requests_total", {"outcome": name}) or 0.0

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
