"""The built-in entries of every registry, declared lazily (see :mod:`pumer_plug.registry`).

Each line names an entry, where it lives (``"module:attribute"``, imported by the registry's first
``get``) and the summary ``pumer-plug list`` prints (the first paragraph of its docstring); a
method also names its config class, which lives in a torch-free module. So ``pumer-plug list``
and ``pumer_plug.list_methods()`` import neither torch nor transformers, and ``get("timm-vit")``
imports timm's adapter without ViLT's. A new built-in adapter, method, task or bench setup is
declared here; ``tests/test_registry.py`` checks that every declaration imports, matches the
object's docstring and config class, and that nothing else is registered on import.
"""
from __future__ import annotations

from pumer_plug.registry import ADAPTERS, BENCH_MODELS, METHODS, TASKS

_A, _B, _E = "pumer_plug.adapters", "pumer_plug.baselines", "pumer_plug.evaluation"
_KEEP = "keep 192 / 128 / 64"

# -- methods: what to do with the tokens ---------------------------------------------------------
METHODS.declare("pumer", "pumer_plug.pumer:Pumer", "Token reducer of PuMer Alg. 1, applied per segment of each stream.",
                config_class="pumer_plug.config:PumerConfig")
METHODS.declare("tome", f"{_B}.tome:Tome",
                "Token merging by bipartite soft matching over a whole stream (ToMe Sec. 3), with ToMe's split by "
                'position (tome.merge.bipartite_soft_matching; split="position").',
                config_class=f"{_B}.tome_config:TomeConfig")
METHODS.declare("dynamicvit", f"{_B}.dynamicvit:DynamicViT",
                "Learned image-token pruning (DynamicViT Sec. 3) behind the plug-in interface.",
                config_class=f"{_B}.dynamicvit_config:DynamicViTConfig")
METHODS.declare("smres", f"{_B}.smres:SmRes", 'Downsamples the input images before the model (PuMer Table 2, "SmRes").',
                config_class=f"{_B}.smres_config:SmResConfig")
METHODS.declare("fastv", f"{_B}.fastv:FastV",
                "Keeps the image tokens the last prompt token attends to most (FastV Sec. 4).",
                config_class=f"{_B}.keep_config:FastVConfig")
METHODS.declare("random", f"{_B}.random_prune:RandomPrune",
                "Keeps a seeded random subset of the image tokens at layer K (in their original order).",
                config_class=f"{_B}.keep_config:RandomConfig")
METHODS.declare("pool", f"{_B}.pool:Pool",
                "Average-pools the image grid before the decoder (one reduction, reported at layer 0).",
                config_class=f"{_B}.pool_config:PoolConfig")

# -- adapters: where things are in a backbone ----------------------------------------------------
ADAPTERS.declare("vilt", f"{_A}.vilt:ViltAdapter", "Attaches a reduction method to a transformers ViLT model.")
ADAPTERS.declare("meter", f"{_A}.meter:MeterAdapter",
                 "Attaches a reduction method to a METER model (reduction layers = co-attention blocks).")
ADAPTERS.declare("bridgetower", f"{_A}.bridgetower:BridgeTowerAdapter",
                 "Attaches a reduction method to a transformers BridgeTower model (reduction layers = cross pairs).")
ADAPTERS.declare("timm-vit", f"{_A}.vit:TimmVitAdapter",
                 "Attaches a reduction method to a timm VisionTransformer (ViT, DeiT, DeiT-distilled, ...).")
ADAPTERS.declare("open-clip-vit", f"{_A}.open_clip_vit:OpenClipVitAdapter",
                 "Attaches a reduction method to open_clip's VisionTransformer (or a CLIP model's .visual).")
ADAPTERS.declare("llava", f"{_A}.llava:LlavaAdapter",
                 "Attaches a reduction method to a transformers LLaVA model (one image per sample).")

# -- tasks: compare/sweep/finetune --task NAME ---------------------------------------------------
TASKS.declare("builtin", f"{_E}.tasks.builtin_task:BuiltinDigitsTask",
              "VQA over real handwritten digits with the built-in ViLT (shipped in the package; retrained if stale).")
TASKS.declare("builtin-llava", f"{_E}.tasks.builtin_llava_task:BuiltinLlavaTask",
              "VQA over real handwritten digits with the built-in LLaVA (trained on first use, then cached).")
TASKS.declare("vqav2", f"{_E}.tasks.vqav2_task:Vqav2Task",
              "VQAv2 on the user's model; options: model, data_dir, split (default val), limit, ...")
TASKS.declare("nlvr2", f"{_E}.tasks.classification_tasks:Nlvr2Task",
              "NLVR2 on the user's two-image model; options as vqav2 (default split dev).")
TASKS.declare("snli-ve", f"{_E}.tasks.classification_tasks:SnliVeTask",
              "SNLI-VE on the user's 3-way classifier; options as vqav2 (default split test).")
TASKS.declare("flickr30k", f"{_E}.tasks.retrieval_task:Flickr30kRetrievalTask",
              "Flickr30k retrieval on the user's ITM model (ViltForImageAndTextRetrieval); default split test.")
TASKS.declare("custom", f"{_E}.tasks.custom_task:CustomTask",
              "Your own VQA or classification data; building one returns a VQA or a classification task.")

# -- bench setups: bench --model NAME ------------------------------------------------------------
BENCH_MODELS.declare("vilt-b32", f"{_E}.studies.bench:vilt_b32",
                     "ViLT-B/32 from the default ViltConfig; PuMer at layers 2,4,6,8, k=0.1, r=0.3, t=0.2.")
BENCH_MODELS.declare("meter-base", f"{_E}.studies.bench:meter_base",
                     "METER-CLIP16-RoBERTa base from the default MeterConfig (VQA head); PuMer preset meter-vqa "
                     "(co-attention blocks 0-3, k = r = t = 0.2). The paper's figure for this setting is 92 -> 64.7 "
                     "GMACs (PuMer Table 7; the vision encoder is not reduced).")
BENCH_MODELS.declare("meter-base-eager", f"{_E}.studies.bench:meter_base_eager",
                     "meter-base with the eager co-attention (probabilities computed; METER's original code path).")
BENCH_MODELS.declare("bridgetower-base", f"{_E}.studies.bench:bridgetower_base",
                     "BridgeTowerModel from the default BridgeTowerConfig (random init) at its image size; PuMer with "
                     "the METER VQAv2 ratios on cross-modal layers 0-3 (k = r = t = 0.2).")
BENCH_MODELS.declare("llava-cpu", f"{_E}.decoder_bench:llava_cpu",
                     "LLaVA-1.5's geometry on a CPU (576 image tokens, 32 decoder layers, C = 256; random init): time "
                     "to first token, decode tokens/s, KV-cache MiB and prefill FLOPs of dense and --method at "
                     f"{_KEEP} (all: every method). sizes override DecoderBenchConfig fields.")
