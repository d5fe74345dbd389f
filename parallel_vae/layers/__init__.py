"""Treatments of one specific diffusers layer kind each (a conv class with its own cache, padding or chunking,
a family's noise or attention), built on the family-agnostic pieces of :mod:`parallel_vae.core`:

* ``causal_cache_conv``: causal 3-D convs with a frame cache (Wan, Qwen-Image) and their cache-aware checkpoint;
* ``pad_conv``: pad-then-conv modules (HunyuanVideo, HunyuanVideo-1.5);
* ``pad_downsample``: a pad's bottom row before a stride-2 conv (Wan/Qwen-Image ``ZeroPad2d``, ``Downsample2D``);
* ``cogvideox_conv``: ``CogVideoXSafeConv3d``'s own forward, and a conv whose caller zero-pads (CogVideoX);
* ``replicate_causal_conv``: ``CogVideoXCausalConv3d`` in replicate mode (Mochi);
* ``ltx_noise``: LTX-Video's per-pixel decoder noise;
* ``linear_attention``: DC-AE's ReLU linear attention;
* ``frame_conv2d``: a 2-D conv standing in for a causal 3-D one on single frames (Qwen-Image 2.1);
* ``kvae_cached_conv``: KVAE-Video's cached causal 3-D conv, replicate-padded (Kandinsky 5);
* ``spatial_pad_conv``: causal 3-D convs that pad space themselves, and their pad-then-stride-2 downsampler (MiniMax-H3);
* ``vit_decoder``: a ViT decoder over latent tokens, sequence-parallel attention with global rotary positions (MiniMax-H3);
* ``neighborhood_attention``: windowed (neighbourhood) attention and its rotary positions (LTX-2.5's diffusion decoder).
"""
