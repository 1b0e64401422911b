"""The model families served by the generic adapter alone: one declarative ``ModelRow`` each (base.py's shape table).

Each row says which transformer classes it serves, which block lists the transformer runs (in execution order) and
their shape; a family whose blocks fit no shape gets its own file with a ``TableAdapter`` subclass or an
``Adapter`` (dit.py, flux.py, sd3.py). What each module's input is, per family, is noted beside its row; the shapes'
inputs are in base.py and docs/spec.md ("Input and output").
"""

from __future__ import annotations

from .base import Blocks, ModelRow, Slot, register_row

ROWS = (
    # PixArt-alpha/sigma: BasicTransformerBlock with ada_norm_single. attn1 and ff get the norm of the residual stream
    # modulated by the shared adaLN-single table; attn2 (cross-attention to the T5 tokens) gets the residual stream
    # itself (no norm, no gate). Outputs are taken before gates and residual adds.
    ModelRow("PixArt", "PixArtAlphaPipeline, PixArtSigmaPipeline", ("PixArtTransformer2DModel",),
             (Blocks("transformer_blocks", "basic"),), refuse_chunking=True),
    # Latte: layer i runs the spatial block on every frame (batch B·F: attn1, attn2, ff), then the temporal block
    # on every patch position (batch B·P: attn1, ff). attn1 and ff get the modulated norm, attn2 the residual
    # stream. Both leading dimensions are batch-major, so per-sample norms never mix videos or CFG halves.
    ModelRow("Latte", "LattePipeline", ("LatteTransformer3DModel",),
             (Blocks("transformer_blocks", "basic"), Blocks("temporal_transformer_blocks", "self_attn_ff")),
             interleave=True, refuse_chunking=True),
    # HunyuanVideo: dual-stream blocks (joint attention, video and text MLPs on their modulated norms), then
    # single-stream blocks running proj_mlp and attn on one modulated norm of the video+text sequence; attn gets it
    # split back into the two streams. proj_out (shared by both branches, not separable) and act_mlp run at every
    # step; so does the text refiner (small, text only). The token-replace (I2V) variant has the same layout.
    ModelRow("HunyuanVideo", "HunyuanVideoPipeline, HunyuanVideoImageToVideoPipeline",
             ("HunyuanVideoTransformer3DModel",),
             (Blocks("transformer_blocks", "double_stream"),
              Blocks("single_transformer_blocks", "single_stream_joint"))),
    # Wan 2.1 / 2.2: attn1 (self-attention with RoPE) on the modulated norm, attn2 (cross-attention to the text, and
    # to the image tokens for image-to-video) on the optionally normed residual stream, ffn on the modulated norm.
    # Wan 2.2's A14B pipelines hold two experts, transformer (high noise, the first steps) and transformer_2 (low
    # noise): both are listed, and one enable serves both (docs/spec.md, "Several transformers").
    ModelRow("Wan 2.1 / 2.2", "WanPipeline, WanImageToVideoPipeline", ("WanTransformer3DModel",),
             (Blocks("blocks", "cross_attn_ffn"),), experts=("transformer", "transformer_2")),
    # CogVideoX: attn1 is the joint attention over the modulated norms of the video and text streams (returns
    # (video_out, text_out)); ff runs once on the concatenation [norm_text; norm_video]: one module, one input.
    ModelRow("CogVideoX", "CogVideoXPipeline, CogVideoXImageToVideoPipeline", ("CogVideoXTransformer3DModel",),
             (Blocks("transformer_blocks", "joint_attn_ff"),)),
    # FLUX.2: FLUX-style double-stream blocks, then single-stream blocks whose attn fuses attention and MLP (one
    # module on the modulated norm of the text+image sequence, returning the output before the gate). Reference
    # images (FLUX.2 editing) are extra image tokens: part of the sequences the modules see.
    ModelRow("FLUX.2", "Flux2Pipeline", ("Flux2Transformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"),
              Blocks("single_transformer_blocks", "single_stream_fused"))),
    # Qwen-Image (and Qwen-Image-Edit: the reference image's tokens are appended to the image stream, so the joint
    # attention and img_mlp see them): joint attention over the modulated image and text norms, then per-stream MLPs.
    ModelRow("Qwen-Image", "QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline",
             ("QwenImageTransformer2DModel",), (Blocks("transformer_blocks", "double_stream_img_txt"),)),
    # Qwen-Image 2.1: one text+image sequence per block (block-causal attention), attn and img_mlp on its modulated
    # norm. With the pipeline's KV cache the first step sees prefix + target tokens and later steps the target
    # only: the shape change makes the modules run and record at the next step (docs/spec.md, "Cached modules").
    ModelRow("Qwen-Image 2.1", "QwenImage21Pipeline", ("QwenImage21Transformer2DModel",),
             (Blocks("transformer_blocks", "single_stream_img_mlp"),)),
    # FLUX.1-style derivatives: the same double- then single-stream layout and module names as FLUX.1
    ModelRow("Chroma", "ChromaPipeline", ("ChromaTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream"))),
    ModelRow("Bria", "BriaPipeline", ("BriaTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream"))),
    ModelRow("LongCat-Image", "LongCatImagePipeline, LongCatImageEditPipeline", ("LongCatImageTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream"))),
    ModelRow("Ovis-Image", "OvisImagePipeline", ("OvisImageTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream"))),
    # HunyuanImage 2.1: HunyuanVideo's layout (single blocks' attn takes the two streams split back)
    ModelRow("HunyuanImage", "HunyuanImagePipeline", ("HunyuanImageTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"),
              Blocks("single_transformer_blocks", "single_stream_joint"))),
    # HunyuanVideo 1.5: double-stream blocks only
    ModelRow("HunyuanVideo 1.5", "HunyuanVideo15Pipeline, HunyuanVideo15ImageToVideoPipeline",
             ("HunyuanVideo15Transformer3DModel",), (Blocks("transformer_blocks", "double_stream"),)),
    # Mochi: asymmetric double-stream blocks (the text stream narrower); the last block has no text MLP
    ModelRow("Mochi", "MochiPipeline", ("MochiTransformer3DModel",),
             (Blocks("transformer_blocks", "double_stream_attn1"),)),
    # CogView4: joint attention only; the block calls one ff on each stream in turn (two calls: not cacheable)
    ModelRow("CogView4", "CogView4Pipeline, CogView4ControlPipeline", ("CogView4Transformer2DModel",),
             (Blocks("transformer_blocks", "joint_attn"),)),
    # BasicTransformerBlock-like blocks: attn1 on the modulated norm, attn2 to the text, ff on the modulated norm
    ModelRow("LTX-Video", "LTXPipeline, LTXImageToVideoPipeline, LTXConditionPipeline",
             ("LTXVideoTransformer3DModel",), (Blocks("transformer_blocks", "basic"),)),
    ModelRow("Allegro", "AllegroPipeline", ("AllegroTransformer3DModel",), (Blocks("transformer_blocks", "basic"),)),
    # Sana: linear self-attention, cross-attention, and a convolutional MLP (GLUMBConv) called on the modulated norm
    # reshaped to (B, C, H, W)
    ModelRow("Sana", "SanaPipeline, SanaSprintPipeline", ("SanaTransformer2DModel",),
             (Blocks("transformer_blocks", "basic"),)),
    ModelRow("Cosmos", "CosmosTextToWorldPipeline, Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline",
             ("CosmosTransformer3DModel",), (Blocks("transformer_blocks", "basic"),)),
    # Lumina2: the main layers only; the two refiners (text-only context refiner, image-only noise refiner) are
    # small and run at every step
    ModelRow("Lumina2", "Lumina2Pipeline", ("Lumina2Transformer2DModel",), (Blocks("layers", "attn_feed_forward"),)),
    # GLM-Image: CogView4's block layout (ff called once per stream: the joint attention only)
    ModelRow("GLM-Image", "GlmImagePipeline", ("GlmImageTransformer2DModel",),
             (Blocks("transformer_blocks", "joint_attn"),)),
    # Wan-style blocks in other families
    ModelRow("SkyReels-V2", "SkyReelsV2Pipeline, SkyReelsV2DiffusionForcingPipeline",
             ("SkyReelsV2Transformer3DModel",), (Blocks("blocks", "cross_attn_ffn"),)),
    ModelRow("ChronoEdit", "ChronoEditPipeline", ("ChronoEditTransformer3DModel",),
             (Blocks("blocks", "cross_attn_ffn"),)),
    ModelRow("Helios", "HeliosPipeline", ("HeliosTransformer3DModel",), (Blocks("blocks", "cross_attn_ffn"),)),
    # Wan VACE: every VACE block runs first (on the control latents, producing the hints), then the Wan blocks; its
    # pipeline holds Wan 2.2's two experts too
    ModelRow("Wan VACE", "WanVACEPipeline", ("WanVACETransformer3DModel",),
             (Blocks("vace_blocks", "cross_attn_ffn"), Blocks("blocks", "cross_attn_ffn")),
             experts=("transformer", "transformer_2")),
    # Wan-Animate: Wan blocks on the video+pose tokens (attn2 sees the text and the reference image's CLIP tokens);
    # the face adapters between blocks (cross-attention to the face motion) run at every step
    ModelRow("Wan-Animate", "WanAnimatePipeline", ("WanAnimateTransformer3DModel",),
             (Blocks("blocks", "cross_attn_ffn"),)),
    # HunyuanVideo Framepack: HunyuanVideo's blocks; the clean and history latents of earlier sections are extra
    # tokens prepended to the video stream, so the modules see them
    ModelRow("HunyuanVideo Framepack", "HunyuanVideoFramepackPipeline", ("HunyuanVideoFramepackTransformer3DModel",),
             (Blocks("transformer_blocks", "double_stream"),
              Blocks("single_transformer_blocks", "single_stream_joint"))),
    # MiniMax-H3: one packed text+audio+video sequence per block, attn and ff on its modulated norm; the token
    # refiner (text only) runs at every step
    ModelRow("MiniMax-H3", "MiniMaxH3ModularPipeline", ("MiniMaxH3Transformer3DModel",),
             (Blocks("transformer_blocks", "attn_ff"),)),
    # ACE-Step (music): self-attention and MLP on the modulated norms, cross-attention to the text on a plain norm
    ModelRow("ACE-Step", "AceStepPipeline", ("AceStepTransformer1DModel",), (Blocks("layers", "self_cross_mlp"),)),
    # Kandinsky 5: the visual blocks only; the text blocks (text tokens, modulated by the timestep) run at every step
    ModelRow("Kandinsky 5",
             "Kandinsky5T2VPipeline, Kandinsky5I2VPipeline, Kandinsky5T2IPipeline, Kandinsky5I2IPipeline",
             ("Kandinsky5Transformer3DModel",), (Blocks("visual_transformer_blocks", "self_cross_feed_forward"),)),
    # Nucleus-MoE-Image: attn on the image stream's modulated norm (the block's projected text joins as keys and
    # values only; the output is the image's), img_mlp (a mixture of experts with a shared expert, routed on the
    # timestep and the unmodulated norm inside the module, or a dense MLP in the first and last layers)
    ModelRow("Nucleus-MoE-Image", "NucleusMoEImagePipeline", ("NucleusMoEImageTransformer2DModel",),
             (Blocks("transformer_blocks", "single_stream_img_mlp"),)),
    # LTX-2 (audio+video): every module on its stream's modulated norm (the cross-modal attentions on norms modulated
    # per direction); each returns its query stream's output. Modality-isolation guidance's extra call (its own
    # cache context "uncond_modality", isolate_modalities=True) skips the two cross-modal attentions
    ModelRow("LTX-2", "LTX2Pipeline, LTX2ImageToVideoPipeline, LTX2ConditionPipeline",
             ("LTX2VideoTransformer3DModel",), (Blocks("transformer_blocks", "audio_video"),)),
    # Kandinsky 6 (text+image to video+audio): fused blocks holding a video and an audio decoder block; per stream
    # self-attention then cross-attention to its text branch, then the cross-modal attentions (video queries on
    # audio, audio queries on video), then each stream's feed-forward, all on modulated norms. The text blocks (one
    # list per branch, modulated by the timestep) run at every step. A call without audio latents runs the video
    # path only (the audio modules are then not called)
    ModelRow("Kandinsky 6", "Kandinsky6TI2VAPipeline", ("Kandinsky6Transformer3DModel",),
             (Blocks("visual_transformer_blocks", (
                 Slot("video_dec_block.self_attention", "attn"), Slot("video_dec_block.cross_attention", "cross_attn"),
                 Slot("audio_dec_block.self_attention", "attn"), Slot("audio_dec_block.cross_attention", "cross_attn"),
                 Slot("va_cross_attention", "cross_attn"), Slot("av_cross_attention", "cross_attn"),
                 Slot("video_dec_block.feed_forward", "mlp"), Slot("audio_dec_block.feed_forward", "mlp"))),)),
    # SANA-Video: Sana's block layout (linear self-attention, cross-attention, a convolutional MLP called on the
    # modulated norm reshaped to the latent video grid)
    ModelRow("SANA-Video", "SanaVideoPipeline, SanaImageToVideoPipeline", ("SanaVideoTransformer3DModel",),
             (Blocks("transformer_blocks", "basic"),)),
    # Bria FIBO: FLUX.1's layout; each block's text stream gets its own projected text-encoder layer added
    ModelRow("Bria FIBO", "BriaFiboPipeline, BriaFiboEditPipeline", ("BriaFiboTransformer2DModel",),
             (Blocks("transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "single_stream"))),
    # Motif-Video: HunyuanVideo-like double- then single-stream blocks, each optionally with a text cross-attention
    # whose input is the joint attention's image output; the last single blocks (decoder layers) attend to the
    # encoder layers' output instead of the text and have no cross-attention
    ModelRow("Motif-Video", "MotifVideoPipeline, MotifVideoImage2VideoPipeline", ("MotifVideoTransformer3DModel",),
             (Blocks("transformer_blocks", "double_stream_cross"),
              Blocks("single_transformer_blocks", "single_stream_joint_cross"))),
    # HunyuanDiT: BasicTransformerBlock-like blocks in a U-shape (the later half's blocks first fuse a long skip from
    # the earlier half, skip_norm and skip_linear, which run at every step). attn1 on norm1's shifted norm of the
    # residual stream (no scale, no gate), attn2 (cross-attention to the CLIP+T5 text) on a plain norm, ff on a plain
    # norm; all three outputs are added ungated. The blocks offer set_chunk_feed_forward, so enabling refuses it as
    # for every such block (HunyuanDiT's forward ignores the setting)
    ModelRow("HunyuanDiT", "HunyuanDiTPipeline", ("HunyuanDiT2DModel",), (Blocks("blocks", "basic"),),
             refuse_chunking=True),
    # AuraFlow: MMDiT blocks (joint attention over the image and text streams' modulated norms, the register tokens
    # leading the text stream; each MLP on its stream's norm of the gated attention residual, modulated), then
    # single blocks over the text+image sequence with the same layout on one stream (attn, ff). Outputs are taken
    # before the gates
    ModelRow("AuraFlow", "AuraFlowPipeline", ("AuraFlowTransformer2DModel",),
             (Blocks("joint_transformer_blocks", "double_stream"), Blocks("single_transformer_blocks", "attn_ff"))),
    # FLUX.3: per-mode blocks (each token mode self-attends within itself), then joint single blocks over
    # [text; image; reference images]; every block runs attn and ff in parallel on one modulated norm and adds their
    # sum under one gate, so each module's output is taken before it. Cached: the image's mode blocks, the reference
    # images' mode blocks (image-to-image only: a text-to-image call leaves them uncalled), the single blocks (their
    # input the modulated text and content norms concatenated). The text's mode blocks run at every step: they see
    # the text modulated by timestep 0, the same at every step, so listed first they would make RCS's probe (the
    # first cached module's input) never move; they are small (a few text tokens, 5 of 33 layers at full size)
    ModelRow("FLUX.3", "Flux3ModularPipeline, Flux3DistilledModularPipeline", ("Flux3Transformer2DModel",),
             (Blocks("mode_blocks.image", "attn_ff"), Blocks("mode_blocks.image_cond", "attn_ff"),
              Blocks("single_transformer_blocks", "attn_ff"))),
    # CogView3Plus: CogVideoX's expert blocks (attn1 the joint attention over the image and text streams' modulated
    # norms, returning (image_out, text_out); ff once on the concatenation [norm_text; norm_image])
    ModelRow("CogView3Plus", "CogView3PlusPipeline", ("CogView3PlusTransformer2DModel",),
             (Blocks("transformer_blocks", "joint_attn_ff"),)),
    # Krea 2: one text+image sequence per block, attn and ff each on its own modulated norm (the shared timestep
    # table plus the block's own), outputs before the gates; the text fusion (text only, no timestep) runs every step
    ModelRow("Krea 2", "Krea2Pipeline, Krea2ModularPipeline, Krea2TurboModularPipeline", ("Krea2Transformer2DModel",),
             (Blocks("transformer_blocks", "attn_ff"),)),
    # Ideogram 4: one packed text+image sequence per block (text and image tokens share the residual stream from the
    # start), attention and feed_forward each on its RMS norm scaled by the block's adaLN, outputs taken before their
    # post-norms and tanh gates. Its pipeline runs a second model of this class every step, unconditional_transformer
    # (on the image tokens alone): not listed in experts, which switch between steps (Wan 2.2), so enabling the
    # pipeline caches the conditional transformer only
    ModelRow("Ideogram 4", "Ideogram4Pipeline", ("Ideogram4Transformer2DModel",),
             (Blocks("layers", "attention_feed_forward"),)),
    # PRX: image-stream blocks; attention on the image's modulated norm (the projected text joins as extra keys and
    # values; the output is the image's, before the gate), then a gated MLP the block computes inline,
    # down_proj(gelu(gate_proj(x)) * up_proj(x)) on the modulated norm x: no one module returns the MLP's output, so
    # its two input matmuls are cached (each on x, two thirds of the MLP) and the product and down_proj run every step
    ModelRow("PRX", "PRXPipeline, PRXPixelPipeline", ("PRXTransformer2DModel",),
             (Blocks("blocks", "attention_gate_up"),)),
    # ConsisID: CogVideoX's expert blocks (attn1 the joint attention over the video and text streams' modulated norms,
    # ff once on [norm_text; norm_video]); the perceiver cross-attentions to the face embedding, added after every
    # cross_attn_interval-th block, and the local facial extractor run at every step
    ModelRow("ConsisID", "ConsisIDPipeline", ("ConsisIDTransformer3DModel",),
             (Blocks("transformer_blocks", "joint_attn_ff"),)),
    # JoyImage-Edit Plus: Qwen-Image's double-stream layout (attn the joint attention over the image and text streams'
    # modulated norms; img_mlp and txt_mlp on their modulated norms, outputs before the gates). The image stream is
    # the target's patches then the reference images' (padded to the batch's longest)
    ModelRow("JoyImage-Edit Plus", "JoyImageEditPlusPipeline", ("JoyImageEditPlusTransformer3DModel",),
             (Blocks("double_blocks", "double_stream_img_txt"),)),
    # JoyImage-Edit: the same double-stream layout as its Plus on double_blocks (attn the joint attention over the
    # image and text streams' modulated norms; img_mlp and txt_mlp on their modulated norms, outputs before the gates).
    # The image stream is the target's patches then the reference images' (the pipeline's items, target moved first).
    # The pipeline runs the negative prompt as a second call per step on the same latents without a call context:
    # relcache tells the two apart ("default", "default.2"; docs/spec.md, "Call context")
    ModelRow("JoyImage-Edit", "JoyImageEditPipeline", ("JoyImageEditTransformer3DModel",),
             (Blocks("double_blocks", "double_stream_img_txt"),)),
    # Bria FIBO 2: Z-Image's blocks on one sequence [gist tokens; image; context images to edit] (the gist tokens the
    # perceiver's digest of the text). attention and feed_forward each on its RMS norm scaled by the block's adaLN
    # (per token: noisy image tokens at t, the rest at 0), outputs before their post-norms and tanh gates; the
    # injection blocks' cross_attention (to the block's own text bundle) on a plain RMS norm of the residual stream,
    # output before its post-norm and learned gate. The noise refiner (image and context tokens) and the perceiver run
    # every step. The pipeline runs the negative prompt as a second call per step without a call context: relcache
    # tells the two apart ("default", "default.2"; docs/spec.md, "Call context")
    ModelRow("Bria FIBO 2", "BriaFibo2Pipeline", ("BriaFibo2Transformer2DModel",),
             (Blocks("layers", "attention_cross_feed_forward"),)),
    # the generic Transformer2DModel: BasicTransformerBlocks in every mode (patched DiT- or PixArt-style configs, the
    # VQ-Diffusion denoiser over discrete latents, the spatial transformer of UNets), attn1, attn2 and ff each on its
    # (modulated) norm; from_pretrained remaps DiT and PixArt configs to their own classes, so this serves the
    # models built directly and VQ-Diffusion (its discrete input checked with a tiny vectorized model in a hand-written
    # loop, RFC and CFG-Cache included; the pipeline itself is not in the tests)
    ModelRow("Transformer2DModel", "VQDiffusionPipeline", ("Transformer2DModel",),
             (Blocks("transformer_blocks", "basic"),), refuse_chunking=True),
)

for _row in ROWS:
    register_row(_row)
