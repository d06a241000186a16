"""The ``train`` section: distributed contrastive training on Ray Train.

The defaults suit a laptop (one CPU worker, small batch, fp32, plain DDP). The paper's recipe
(LoRA r16 on all linear layers, gradient checkpointing, bf16, AdamW 1e-4 with 100 warmup steps
then linear decay, weight decay 0.1, tau 0.02, one hard negative, batch 2048 through the
cross-worker gather plus GradCache chunking, DeepSpeed ZeRO-3) is jobs/configs/gpu/train.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayembed.config.base import ConfigError, option


@dataclass
class DeepSpeedConfig:
    """DeepSpeed settings; the DeepSpeed JSON is generated from these plus the train section."""

    zero_stage: int = option(3, "ZeRO stage (0, 1, 2 or 3). 3 partitions parameters, gradients and optimizer state.")
    offload_optimizer: Literal["none", "cpu"] = option("none", "Keep the optimizer state in CPU memory (ZeRO offload).")
    offload_params: Literal["none", "cpu"] = option("none", "Keep partitioned parameters in CPU memory (ZeRO-3 only).")
    torch_adam: bool = option(
        True, "Use torch's AdamW inside DeepSpeed instead of its fused op (which compiles with nvcc on first use)."
    )
    skip_shm_comm_build: bool = option(
        True,
        "Do not compile DeepSpeed's shared-memory comm op on CPU (costs 50-70 s per fresh machine; "
        "results are the same without it).",
    )

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}.")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError(
                "train.deepspeed.offload_params needs ZeRO stage 3; set train.deepspeed.zero_stage=3 "
                "or train.deepspeed.offload_params=none."
            )


@dataclass
class HeadsLossWeights:
    """Weights of each head's InfoNCE loss (and of its score in the self-distillation teacher)."""

    dense: float = option(1.0, "Weight of the dense (pooled vector) loss and score.")
    sparse: float = option(0.3, "Weight of the sparse lexical loss and score (BGE-M3: 0.3).")
    multivector: float = option(1.0, "Weight of the multi-vector (MaxSim) loss and score.")

    def __post_init__(self) -> None:
        for name in ("dense", "sparse", "multivector"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"train.heads_loss_weights.{name} must be >= 0, got {value}.")
        if self.dense + self.sparse + self.multivector <= 0:
            raise ConfigError("train.heads_loss_weights are all 0; give at least one head a positive weight.")


@dataclass
class TrainConfig:
    """Contrastive (E5), SimCSE or MNTP training of an embedder on Ray Train workers."""

    output_dir: str | None = option(None, "Where this stage writes. Empty: <run_dir>/train.")
    mode: Literal["contrastive", "simcse", "mntp", "rerank"] = option(
        "contrastive",
        "contrastive: supervised InfoNCE with instructions and hard negatives (E5). simcse: "
        "unsupervised, two dropout views of one text are positives (LLM2Vec step 3). mntp: masked "
        "next-token prediction with bidirectional attention (LLM2Vec step 2). rerank: a causal LM "
        "learns to score the positive above its hard negatives (RankLLaMA); exports an LLM reranker.",
    )
    engine: Literal["auto", "deepspeed", "ddp"] = option(
        "auto", "Distributed engine. auto: deepspeed (ZeRO) when use_gpu, ddp otherwise."
    )
    num_workers: int = option(1, "Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = option(False, "Give each worker a GPU.")
    cpus_per_worker: float = option(
        0.5, "Logical CPUs per worker. Fractions keep Ray Data readers from starving on small machines."
    )
    gpus_per_worker: float = option(1.0, "GPUs per worker when use_gpu is true.")
    resources_per_worker: dict[str, float] = option(
        help="Custom Ray resources each worker also asks for, e.g. {worker: 1} to place one worker per "
        "node that offers one `worker` (CPU and GPU come from cpus_per_worker and gpus_per_worker).",
        factory=dict,
    )
    batch_size: int = option(
        16,
        "Global batch in examples per optimizer step, summed over workers (paper: 2048). In-batch "
        "negatives are gathered across workers, so every query sees the whole global batch.",
    )
    chunk_size: int = option(
        0,
        "GradCache chunk in examples per worker: embeddings are computed without gradients in "
        "chunks of this size, the loss is taken over the full batch, then gradients are replayed "
        "chunk by chunk. Memory scales with the chunk, not the batch. 0: off.",
    )
    length_buckets: int | None = option(
        None,
        "Each padded group (queries, documents) goes through the model as at most this many sub-batches "
        "of similar length, each cut to its own longest row, so padding costs less compute; the vectors "
        "are the same. 1: off. Empty: 4 with the DDP engine on CPU (compute grows with padded tokens), "
        "1 on GPUs and under DeepSpeed (each sub-batch is another forward, which gathers ZeRO-3 weights "
        "again).",
    )
    max_steps: int = option(100, "Optimizer steps to run (the paper: one epoch, under 1k steps).")
    lr: float = option(1e-4, "Peak learning rate of AdamW.")
    warmup_steps: int = option(10, "Linear warm-up steps before the linear decay to zero (paper: 100).")
    weight_decay: float = option(0.1, "AdamW weight decay.")
    adam_betas: list[float] = option(help="AdamW betas.", factory=lambda: [0.9, 0.999])
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip gradients to this global norm; 0 disables clipping.")
    temperature: float = option(0.02, "InfoNCE temperature tau (logits are cosine / tau).")
    num_negatives: int | None = option(
        None, "Hard negatives per example (paper: 1). Empty: data.stream.num_negatives."
    )
    query_max_length: int = option(512, "Maximum query length in tokens, instruction and EOS included.")
    doc_max_length: int = option(512, "Maximum document length in tokens, EOS included.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Training precision. auto: bf16 on GPU, fp32 on CPU."
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (saves memory, costs ~30% time)."
    )
    mntp_mask_rate: float = option(
        0.2, "mntp: fraction of tokens replaced by the mask token (LLM2Vec: 0.2 Llama, 0.8 Mistral)."
    )
    mntp_mask_token: str = option("_", "mntp: the text used as mask token when the tokenizer has none.")
    simcse_dropout: float = option(0.3, "simcse: attention and hidden dropout that makes the two views differ.")
    checkpoint_every: int = option(50, "Save a checkpoint every N steps (and always at the end).")
    keep_checkpoints: int = option(2, "How many of the latest checkpoints to keep in storage.")
    max_failures: int = option(
        3, "Worker failures to recover from by restarting from the latest checkpoint; -1: unlimited."
    )
    storage_path: str | None = option(
        None,
        "Where Ray Train keeps checkpoints: a local folder or a pyarrow.fs URI (s3://, gs://). "
        "On a multi-node cluster it must be shared storage. Empty: <output_dir>/ray.",
    )
    run_name: str = option("train", "Ray Train run name (its folder under storage_path). Same name: resume.")
    log_every: int = option(
        10,
        "Report metrics to Ray Train and the console every N steps. Each report is a barrier across "
        "workers (~0.1-1 s); every step is still recorded in metrics.jsonl and the checkpoints.",
    )
    eval_every: int = option(0, "Evaluate nDCG@10 on the validation set every M steps; 0: off.")
    eval_dataset: str | None = option(
        None, "Validation set for eval_every: a BEIR folder, or a name under data_dir (msmarco-subset)."
    )
    eval_max_docs: int = option(2000, "Cap on validation documents encoded per evaluation.")
    merge_lora: bool = option(False, "Also save a merged full model (LoRA folded into the weights).")
    fail_at_step: int = option(
        0,
        "Fault-injection for tests and drills: worker rank 1 (or 0 if alone) exits hard once at "
        "this step, on an attempt that started without a checkpoint, once Ray has committed the "
        "checkpoints reported so far (so the retry resumes from the latest). 0: off.",
    )

    heads_loss_weights: HeadsLossWeights = option(
        help="With model.heads: the loss is the weighted sum of each head's InfoNCE (BGE-M3: 1, 0.3, 1).",
        factory=HeadsLossWeights,
    )
    self_distill: bool = option(
        False,
        "With model.heads: BGE-M3 self-knowledge distillation. The softmax of the weighted sum of all "
        "heads' scores (detached) is a soft target each head is also trained towards.",
    )
    self_distill_weight: float = option(1.0, "Weight of the self-distillation terms beside the InfoNCE terms.")

    matryoshka_dims: list[int] = option(
        help="Matryoshka training: also apply the contrastive InfoNCE to the first d coordinates of every "
        "vector, re-normalised, for each d listed (strictly increasing, below the model's dimension; the "
        "full dimension is always trained), e.g. [64, 128, 256]. The losses are summed (weighted by "
        "matryoshka_weights). The exported embedder_config.json records the sizes, and /v1/embeddings "
        "serves them as `dimensions`. Empty: full vectors only.",
        factory=list,
    )
    matryoshka_weights: list[float] = option(
        help="Weights of the Matryoshka terms: one per entry of matryoshka_dims, then one for the full "
        "dimension (so len(matryoshka_dims) + 1 numbers). Empty: 1 each.",
        factory=list,
    )

    deepspeed: DeepSpeedConfig = option(help="DeepSpeed (ZeRO) settings.", factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be at least 1, got {self.num_workers}.")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be positive, got {self.cpus_per_worker}; try 0.5.")
        for name, amount in self.resources_per_worker.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(
                    f"train.resources_per_worker.{name}: use train.cpus_per_worker / train.gpus_per_worker for "
                    "CPUs and GPUs; resources_per_worker holds custom resources only."
                )
            if amount <= 0:
                raise ConfigError(f"train.resources_per_worker.{name} must be positive, got {amount}.")
        if self.batch_size < 1 or self.batch_size % self.num_workers:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be a positive multiple of "
                f"train.num_workers={self.num_workers}; each worker takes batch_size / num_workers."
            )
        if self.length_buckets is not None and self.length_buckets < 1:
            raise ConfigError(f"train.length_buckets={self.length_buckets} must be at least 1 (1: off), or empty.")
        per_worker = self.batch_size // self.num_workers
        if self.chunk_size < 0 or (self.chunk_size and per_worker % self.chunk_size):
            raise ConfigError(
                f"train.chunk_size={self.chunk_size} must be 0 (off) or divide the per-worker batch "
                f"{per_worker} (batch_size / num_workers)."
            )
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1, got {self.max_steps}.")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must hold two numbers, got {self.adam_betas}.")
        if self.temperature <= 0:
            raise ConfigError(f"train.temperature must be positive, got {self.temperature}; the paper uses 0.02.")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ConfigError(f"train.num_negatives must be >= 0, got {self.num_negatives}.")
        if self.query_max_length < 8 or self.doc_max_length < 8:
            raise ConfigError("train.query_max_length and train.doc_max_length must be at least 8 tokens.")
        if not 0.0 < self.mntp_mask_rate < 1.0:
            raise ConfigError(f"train.mntp_mask_rate must be in (0, 1), got {self.mntp_mask_rate}.")
        if not 0.0 <= self.simcse_dropout < 1.0:
            raise ConfigError(f"train.simcse_dropout must be in [0, 1), got {self.simcse_dropout}.")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every must be at least 1 step, got {self.checkpoint_every}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints must be at least 1, got {self.keep_checkpoints}.")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be at least 1, got {self.log_every}.")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {self.eval_every}.")
        if self.eval_every and not self.eval_dataset:
            raise ConfigError("train.eval_every is set but train.eval_dataset is empty; name a BEIR folder.")
        if self.self_distill_weight < 0:
            raise ConfigError(f"train.self_distill_weight must be >= 0, got {self.self_distill_weight}.")
        if self.mode == "mntp" and self.chunk_size:
            raise ConfigError("train.chunk_size (GradCache) applies to contrastive modes; set it to 0 for mntp.")
        self._check_matryoshka()

    def _check_matryoshka(self) -> None:
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if weights and not dims:
            raise ConfigError(
                "train.matryoshka_weights is set but train.matryoshka_dims is empty; list the sizes to train, "
                "e.g. train.matryoshka_dims=[64,128,256], or drop the weights."
            )
        if not dims:
            return
        if self.mode not in ("contrastive", "simcse"):
            raise ConfigError(
                f"train.matryoshka_dims trains nested embedding vectors; train.mode={self.mode} makes no "
                "embeddings to nest. Use mode contrastive or simcse, or set train.matryoshka_dims=[]."
            )
        if any(isinstance(k, bool) or k < 1 for k in dims):
            raise ConfigError(f"train.matryoshka_dims must hold positive sizes, got {dims}; e.g. [64, 128, 256].")
        if any(b <= a for a, b in zip(dims, dims[1:])):
            raise ConfigError(
                f"train.matryoshka_dims must be strictly increasing without repeats, got {dims}; "
                f"write them as {sorted(set(dims))}."
            )
        if weights:
            if len(weights) != len(dims) + 1:
                raise ConfigError(
                    f"train.matryoshka_weights needs {len(dims) + 1} numbers, one per size in "
                    f"train.matryoshka_dims={dims} and one for the full dimension last; got {len(weights)}."
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(
                    f"train.matryoshka_weights must be >= 0 with at least one positive, got {weights}."
                )

    def resolved_engine(self) -> str:
        """The engine actually used: auto picks deepspeed on GPU, ddp on CPU."""
        if self.engine == "auto":
            return "deepspeed" if self.use_gpu else "ddp"
        return self.engine

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision
