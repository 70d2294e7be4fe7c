#!/usr/bin/env bash
# On the GPU machine, right after `source scripts/gpu_setup.sh part01`: the benchmarks whose numbers the README
# quotes, each under its own time limit so one slow part cannot take the others down. Results go to $OUT.
#   bash scripts/gpu_agenda.sh auto selfspec ar peers gptfast     (any subset, in the order given)
# gptfast needs .peers carried (bash scripts/fetch_gptfast.sh here first); qwen needs the SpecAttn-S pair stored
# and joined first (scripts/gpu_qwen_pair.sh: SPECATTN_QWEN_DRAFT / SPECATTN_QWEN_TARGET set).
set -u
for part in "$@"; do
  case "$part" in
    auto)     timeout 260 python3 benchmarks/auto.py --out "$OUT/auto.json" 2>&1 | grep -v -i warn | grep -v "^\[" | tail -14 ;;
    selfspec) timeout 400 python3 benchmarks/selfspec.py --cells 8x8000,32x8000,64x8000 --sampling-cells 32x8000 \
                --budgets 512 --methods magicdec,specattn-y,specattn-y/blk64,vegas --skip-8b --out "$OUT/selfspec.json" \
                2>&1 | grep -v -i warn | tail -12 ;;
    ar)       timeout 240 python3 benchmarks/ar.py --out "$OUT/ar.json" 2>&1 | grep -v -i warn | tail -20 ;;
    peers)    timeout 300 python3 benchmarks/peers.py --peers eager,assisted --out "$OUT/peers.json" 2>&1 | grep "^{" | tail -14 ;;
    peers-compile)   # transformers' static cache + torch.compile: minutes of compiling per shape, so on its own
              timeout 400 python3 benchmarks/peers.py --peers static-compile --cells 1x512,16x4096 --spec-cell none \
                --out "$OUT/peers_compile.json" 2>&1 | grep "^{" | tail -6 ;;
    gptfast)  timeout 400 python3 benchmarks/gptfast_peer.py --gpt-fast .peers/gpt-fast --out "$OUT/gptfast.json" \
                2>&1 | grep -v -i warn | grep -v "self.gen" | tail -6 ;;
    qwen)     timeout 500 python3 -m specattn.cli bench --model "$SPECATTN_QWEN_TARGET" --draft "$SPECATTN_QWEN_DRAFT" \
                --layer-map benchmarks/results/layermap_qwen.json --methods ar,draft-spec,specattn-s --page-level \
                --keys-p 0.95 --context 8000 --batch 1,8,32 --new-tokens 128 --text .data/gutenberg/pg2554.txt \
                --quiet --json "$OUT/specattn_s_e2e.json" 2>&1 | grep -v -i warn | tail -14 ;;
    qwen-keysteps)   # SpecAttn-S with keys from the last draft step (a quarter of the draft's page-mass work), at
              # p 0.95 and 0.9; each run has its own draft-spec and AR, so every ratio is within one run. Keys from
              # all steps at these cells: specattn_s_e2e.json / specattn_s_e2e_long.json.
              for p in 0.95 0.9; do
                timeout 280 python3 -m specattn.cli bench --model "$SPECATTN_QWEN_TARGET" \
                  --draft "$SPECATTN_QWEN_DRAFT" --layer-map benchmarks/results/layermap_qwen.json \
                  --methods ar,draft-spec,specattn-s --page-level --keys-p $p --keys-from-steps last \
                  --context 8000,32000 --batch 8 --new-tokens 128 --text .data/gutenberg/pg2554.txt --quiet \
                  --json "$OUT/specattn_s_e2e_last_p$p.json" 2>&1 | grep -v -i warn | tail -8
              done ;;
    qwen-selfspec)   # SpecAttn-Y and MagicDec self-speculating on the real Qwen2.5-Coder-1.5B (verifier alone: gpu_qwen_pair.sh
              # split/store/join target) at 32K, where KV reads dominate its steps; warm-ups prefill 1,024 tokens, or
              # with QWEN_REUSE_PREFILL=1 each cell prefills once for all methods (~40 s a method saved at b64 x 32K)
              timeout ${QWEN_SELFSPEC_LIMIT:-540} python3 benchmarks/selfspec.py --model "$SPECATTN_QWEN_TARGET" \
                --model-name "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF -> bf16)" --cells "${QWEN_CELLS-32x32000}" \
                --sampling-cells "${QWEN_SAMPLING_CELLS:-}" --budgets ${QWEN_BUDGETS:-1024,2048} \
                --methods ${QWEN_METHODS:-magicdec,specattn-y/blk64} --new-tokens ${QWEN_NEW_TOKENS:-128} \
                --gamma ${QWEN_GAMMA:-4} --dense-layers ${QWEN_DENSE:-none} --repeats ${QWEN_REPEATS:-1} --skip-8b \
                --warm-context 1024 ${QWEN_REUSE_PREFILL:+--reuse-prefill} --out "$OUT/selfspec_qwen.json" 2>&1 \
                | grep -v -i warn | tail -16 ;;
    qwen-divergence)   # where greedy MagicDec departs from AR on the 1.5B at b64 x 32K: near ties or a bug?
              timeout 400 python3 benchmarks/divergence_check.py --model "$SPECATTN_QWEN_TARGET" --batch 64 \
                --context 32000 --method ${DIV_METHOD:-magicdec} --out "$OUT/divergence_qwen_b64.json" 2>&1 \
                | grep -v -i warn | tail -12 ;;
    qwen-repeat)   # the cell where keys from the last step at p 0.9 did best, three timed runs each (median)
              timeout 300 python3 -m specattn.cli bench --model "$SPECATTN_QWEN_TARGET" --draft "$SPECATTN_QWEN_DRAFT" \
                --layer-map benchmarks/results/layermap_qwen.json --methods ar,draft-spec,specattn-s --page-level \
                --keys-p 0.9 --keys-from-steps last --context 8000 --batch 8 --new-tokens 128 --repeats 3 \
                --text .data/gutenberg/pg2554.txt --quiet --json "$OUT/specattn_s_e2e_last_p0.9_r3.json" \
                2>&1 | grep -v -i warn | tail -5 ;;
    selfspec-round)   # model-free: a self-speculation round's time by method (random 1.5B, b64 x 32K), kernel by kernel
              timeout 400 python3 benchmarks/profile_selfspec_round.py "$OUT/profile_selfspec_round_qwen.json" 2>&1 \
                | grep -v -i warn | tail -9 ;;
    bound)    # model-free: the most self-speculation can gain over AR per shape, from graph-timed step costs
              timeout 420 python3 benchmarks/selfspec_bound.py "$OUT/selfspec_bound.json" 2>&1 | grep -v -i warn \
                | tail -12 ;;
    topp-warps) timeout 220 python3 benchmarks/topp_warps.py "$OUT/topp_warps.json" 2>&1 | tail -18 ;;
    draft-splits)   # tile config x split count (1 = no merge launch) for the default model's sparse draft step
              timeout 240 python3 benchmarks/tune_attention.py --splits --batches=32,64 "$OUT/tune_splits_draft.json" \
                2>&1 | grep -v -i warn | tail -4 ;;
    compile-modes)  # the step functions under torch.compile's default mode vs max-autotune-no-cudagraphs, same run
              i=0
              for spec in "--shape smol --batch 32 --draft-budget 512" "--shape 8b --batch 1"; do
                i=$((i + 1))
                timeout 280 python3 benchmarks/profile_step.py $spec --context 8192 --top 6 \
                  --compile-modes default,max-autotune-no-cudagraphs --json "$OUT/compile_modes_$i.json" \
                  2>&1 | grep "^=="
              done ;;
    kernels-page64)   # only the exact page mass of 64-token pages in a 32-layer step, b1 / b8 x 32K (~30 s)
              timeout 120 python3 benchmarks/kernels.py --page64 "$OUT/kernels_page64.json" 2>&1 | tail -3 ;;
    kernels)  timeout 270 python3 benchmarks/kernels.py "$OUT/kernels.json" 2>&1 | tail -2 ;;
    page-mass-check)   # every way of summing page mass against the fp32 reference, compiled (no model files)
              timeout 200 python3 benchmarks/page_mass_check.py --out "$OUT/page_mass_check.json" 2>&1 | tail -4 ;;
    token-checks)   # PDL on/off and small-step kernels vs cuBLAS: greedy tokens on random models (no model files)
              timeout 300 python3 benchmarks/token_checks.py --out "$OUT/pdl_check.json" 2>&1 | grep -v -i warn | tail -2 ;;
    small-gemm)   # the small-step kernels on tensor cores (model.GEMV_MAX_ROWS raised) against cuBLAS, default model
              # batch 64: the draft step (64 rows) and the verify step (320 rows), round-robin (no model files)
              timeout 150 python3 benchmarks/profile_step.py --shape smol --batch 64 --draft-budget 512 \
                --gemv-rows 2,64 --rounds 5 --top 8 --json "$OUT/profile_small_gemm_draft_b64.json" 2>&1 \
                | grep -A 3 "round-robin"
              timeout 150 python3 benchmarks/profile_step.py --shape smol --batch 64 --verify specattn-y/blk64 \
                --q-len 5 --gemv-rows 2,512 --rounds 5 --top 8 --json "$OUT/profile_small_gemm_verify_b64.json" \
                2>&1 | grep -A 3 "round-robin" ;;
    step-variants)   # the 8B-shaped batch-1 step: small-step kernels and PDL modes, timed round-robin (no model)
              timeout 200 python3 benchmarks/profile_step.py --shape 8b --batch 1 --context 8192 --pdl 2,0 \
                --gemv qkv+rope+o+down,none --rounds 5 --top 3 --json "$OUT/profile_variants_8b_b1.json" 2>&1 \
                | grep -A 5 "round-robin" ;;
    early-pages)   # attention's lengths and first pages read before the PDL wait vs after, whole steps round-robin
              timeout 180 python3 benchmarks/profile_step.py --shape 8b --batch 1 --context 8192 --early-pages 1,0 \
                --rounds 7 --top 3 --json "$OUT/profile_early_pages_8b_b1.json" 2>&1 | grep -A 3 "round-robin"
              timeout 150 python3 benchmarks/profile_step.py --shape smol --batch 64 --draft-budget 512 \
                --early-pages 1,0 --rounds 5 --top 3 --json "$OUT/profile_early_pages_draft_b64.json" 2>&1 \
                | grep -A 3 "round-robin" ;;
    smoke)   # every method a user can name, through the CLI on the default model (CPU CI runs the reference
              # attention only): greedy and sampled bench matrices, generate, ppl. Tables go to the log, JSON to $OUT.
              m="--model $SPECATTN_DEFAULT_GGUF"
              t=.data/gutenberg/pg2554.txt
              timeout 240 python3 -m specattn.cli bench $m --methods ar,magicdec,quest,specattn-y,vegas,selfspec-full,auto \
                --context 1k,8000 --batch 1,16 --new-tokens 64 --budget 512 --text $t --quiet \
                --json "$OUT/smoke_greedy.json" 2>&1 | grep -v -i warn | tail -30
              timeout 120 python3 -m specattn.cli bench $m --methods ar,magicdec,quest,specattn-y,vegas \
                --context 4k --batch 8 --new-tokens 64 --budget 512 --temperature 0.6 --top-p 0.95 --text $t --quiet \
                --json "$OUT/smoke_sampled.json" 2>&1 | grep -v -i warn | tail -8
              head -c 16000 $t > /tmp/prompt.txt      # ~4K tokens
              for method in quest specattn-y; do
                timeout 60 python3 -m specattn.cli generate $m --method $method --prompt-file /tmp/prompt.txt --max-new-tokens 32 \
                  --budget 512 2>&1 | grep -v -i warn | tail -2 | cut -c1-300
              done
              timeout 90 python3 -m specattn.cli ppl $m --text $t --context 4k --windows 1 \
                --methods dense,quest:budget=512,streaming:budget=512 --quiet --json "$OUT/smoke_ppl.json" 2>&1 \
                | grep -v -i warn | tail -3 ;;
    quest-e2e)   # Quest drafting with its kernels (bounds update, sorting-free top-k) beside MagicDec and SpecAttn-Y:
              # the bench matrix of `smoke`, then the batch-64 cell of selfspec-r3 with Quest in it
              timeout 200 python3 -m specattn.cli bench --model "$SPECATTN_DEFAULT_GGUF" \
                --methods ar,magicdec,quest,specattn-y --context 1k,8000 --batch 1,16 --new-tokens 64 --budget 512 \
                --text .data/gutenberg/pg2554.txt --quiet --json "$OUT/quest_bench.json" 2>&1 | grep -v -i warn | tail -18
              timeout 300 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,quest,specattn-y/blk64 --skip-8b --repeats 3 --out "$OUT/selfspec_quest.json" \
                2>&1 | grep -v -i warn | tail -6 ;;
    auto-tail)   # auto deciding for the whole batch vs for the sequences still generating, decisions traced
              timeout 280 python3 benchmarks/auto_tail.py --out "$OUT/auto_tail.json" 2>&1 | grep -v -i warn \
                | grep -v "^{" | tail -12 ;;
    sparse-direct)   # the default model's draft step with its sparse attention in one split (no merge launch) vs
              # automatic, batch 64 and 32, budget 512, round-robin (no model files)
              for b in 64 32; do
                timeout 150 python3 benchmarks/profile_step.py --shape smol --batch $b --context 8192 --draft-budget 512 \
                  --sparse-max-splits auto,1 --rounds 7 --top 3 --json "$OUT/profile_sparse_direct_draft_b$b.json" \
                  2>&1 | grep -A 3 "round-robin"
              done ;;
    attn-few)   # attention launches for few programs (FEW_PROGRAMS: block_n:warps:stages:split_factor) in the 8B-shaped
              # batch-1 step, round-robin (no model files)
              timeout 240 python3 benchmarks/profile_step.py --shape 8b --batch 1 --context 8192 \
                --attn-few ${ATTN_FEW:-default,64:4:2:3,64:4:2:4,128:4:1:2} --rounds 7 --top 3 \
                --json "$OUT/profile_attn_few_8b_b1.json" 2>&1 | grep -A 6 "round-robin" ;;
    gemv-70b)   # kernels.gemv tilings vs cuBLAS on one 70B rank's (TP=2) and the 8B shapes, one row (no model files)
              timeout 200 python3 benchmarks/tune_gemv.py --shapes=70b/2,8b --rows=1 "$OUT/tune_gemv_70b.json" 2>&1 \
                | grep "m=1" ;;
    tune-b1)   # batch-1 attention (8B heads, 32K verify and sparse, 8K decode): 4 / 8 warps x 1-4 stages x splits
              timeout 330 python3 benchmarks/tune_attention.py --splits --names=b1-32k-q5-h8,b1-32k-q1-h8,b1-8k-q1-h8 \
                --warps=4,8 --stages=1,2,3,4 --blocks=64,128 "$OUT/tune_splits_b1_stages.json" 2>&1 | grep -v -i warn \
                | grep "auto" | cut -c1-400 ;;
    byproduct)   # verify attention plain vs page mass vs block mass (tile per block, sub-tiles), finishing tiles (no model)
              timeout 200 python3 benchmarks/tune_attention.py --byproduct "$OUT/byproduct.json" 2>&1 | grep "^shape" ;;
    sparse-scaling)   # sparse vs dense with more bytes, logical vs physical page lists (needs no model)
              timeout 120 python3 benchmarks/sparse_scaling.py "$OUT/sparse_scaling_token-major.json" 2>&1 | tail -9 ;;
    selfspec-phys)   # sparse drafts reading physical page lists (+phys) against the same methods without, same run
              timeout 400 python3 benchmarks/selfspec.py --cells 32x8000,64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,magicdec+phys,specattn-y/blk64,specattn-y/blk64+phys --skip-8b \
                --out "$OUT/selfspec_phys.json" 2>&1 | grep -v -i warn | tail -10 ;;
    selfspec-g8)   # longer drafts, where selection quality shows more (CPU: +4.8% tokens per verify vs +1.4% at 4)
              timeout 400 python3 benchmarks/selfspec.py --cells 32x8000,64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,specattn-y,specattn-y/blk64 --gamma 8 --skip-8b --out "$OUT/selfspec_g8.json" \
                2>&1 | grep -v -i warn | tail -8 ;;
    selfspec-r3)   # the batch-64 cell only, median of 3 timed runs per method (single runs move by ±0.1x)
              timeout 400 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,specattn-y,specattn-y/blk64 --skip-8b --repeats 3 --out "$OUT/selfspec_r3.json" \
                2>&1 | grep -v -i warn | tail -6 ;;
    selfspec-every)   # SpecAttn-Y taking the verification's mass every 2nd round (/r2: the verify steps between
              # skip the by-product) beside every round and MagicDec, batch 64, median of 3
              timeout 450 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,specattn-y/blk64,specattn-y/blk64/r2 --skip-8b --repeats 3 \
                --out "$OUT/selfspec_every.json" 2>&1 | grep -v -i warn | tail -6 ;;
    selfspec-fullwave)   # sparse drafts in one split of 256-key tiles (+fullwave) beside the library's launch, same
              # run, median of 3 (random weights, round-robin: 1,331 vs 1,345 us a draft step)
              timeout 400 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,magicdec+fullwave,specattn-y/blk64,specattn-y/blk64+fullwave --skip-8b --repeats 3 \
                --out "$OUT/selfspec_fullwave.json" 2>&1 | grep -v -i warn | tail -7 ;;
    selfspec-page64)   # the real model with 64-token pages (exact page mass through the block path) against pages of
              # 16, b64 x 8K, each run its own AR; median of 2
              for ps in 64 16; do
                timeout 240 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                  --methods specattn-y,specattn-y/blk64 --skip-8b --repeats 2 --page-size $ps \
                  --out "$OUT/selfspec_page$ps.json" 2>&1 | grep -v -i warn | tail -4
              done ;;
    sparse-sweep)   # why sparse attention reads slower than dense (launch sweep; shared-page and contiguous-table
              # controls) at b8 x 32K (--quick); no model
              timeout 300 python3 benchmarks/sparse_sweep.py --quick "$OUT/sparse_sweep.json" 2>&1 | grep -v -i warn \
                | grep -v "launch sweep" | tail -24 ;;
    sparse-b1)   # batch 1 x 32K at 10% (13 MB, kernels.json's summary cell): smaller tiles, fewer warps, more splits
              timeout 240 python3 benchmarks/sparse_sweep.py --batch1 "$OUT/sparse_sweep_b1.json" 2>&1 \
                | grep -v -i warn | grep -v "launch sweep" | tail -12 ;;
    mass-finish)   # a verify step's page mass finished by one launch a step (StepMass) vs one a layer: whole verify
              # steps of the default model's shape at b64 x 8K and the 8B shape at b1 x 32K (random weights, round-robin)
              timeout 150 python3 benchmarks/profile_step.py --shape smol --batch 64 --context 8192 --q-len 5 \
                --verify specattn-y/blk64,specattn-y --mass-finish step,layer --rounds 5 --top 5 \
                --json "$OUT/profile_mass_finish_smol_b64.json" 2>&1 | grep -v -i warn | tail -6
              timeout 150 python3 benchmarks/profile_step.py --shape 8b --batch 1 --context 32768 --q-len 5 \
                --verify specattn-y/blk64 --mass-finish step,layer --rounds 5 --top 5 \
                --json "$OUT/profile_mass_finish_8b_b1.json" 2>&1 | grep -v -i warn | tail -4 ;;
    selfspec-finish)   # the same on the real default model: SpecAttn-Y with the mass finished once a layer
              # (+layerfinish) beside once a step, b64 x 8K, median of 3
              timeout 400 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,specattn-y/blk64,specattn-y/blk64+layerfinish --skip-8b --repeats 3 \
                --out "$OUT/selfspec_finish.json" 2>&1 | grep -v -i warn | tail -7 ;;
    selfspec-tail)   # the fixed batch's tail planned for the sequences left (the default since session 29) beside the
              # old tail (+notail: verify planned for the whole batch, idle sequences drafting their whole lists),
              # real default model, b64 x 8K, median of 3
              timeout 540 python3 benchmarks/selfspec.py --cells 64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,magicdec+notail,specattn-y/blk64,specattn-y/blk64+notail --skip-8b --repeats 3 \
                --out "$OUT/selfspec_tail.json" 2>&1 | grep -v -i warn | tail -8 ;;
    selfspec-nodense)   # layer 0 drafting sparsely too (+nodense, the default since session 17) beside layer 0
              # dense, same run, median of 3 (CPU: 4.411 vs 4.378 tokens per verify; ~0.40 GB of a draft step's bytes)
              timeout 500 python3 benchmarks/selfspec.py --cells ${NODENSE_CELLS:-64x8000} --sampling-cells "" \
                --budgets 512 --methods magicdec,magicdec+nodense,specattn-y/blk64,specattn-y/blk64+nodense --skip-8b \
                --dense-layers 0 \
                --repeats ${NODENSE_REPEATS:-3} --out "$OUT/selfspec_nodense.json" 2>&1 | grep -v -i warn | tail -8 ;;
    qwen-profile)   # the 1.5B's shape (random weights) at b64 x 32K: where a draft step (budget 1024), an AR step and
              # a SpecAttn-Y/blk64 verify step spend their time, per kernel, against their bytes at copy speed. The
              # draft step's lists do not grow with the context, so it runs at 8K: two variants' caches fit at once
              timeout 200 python3 benchmarks/profile_step.py --shape qwen1.5b --batch 64 --context 8192 \
                --draft-budget 1024 --physical-lists off,on --rounds 5 --top 14 \
                --json "$OUT/profile_qwen_draft_b64.json" 2>&1 | grep -v -i warn | tail -36
              timeout 200 python3 benchmarks/profile_step.py --shape qwen1.5b --batch 64 --context 32000 \
                --top 10 --json "$OUT/profile_qwen_ar_b64.json" 2>&1 | grep -v -i warn | tail -12
              timeout 200 python3 benchmarks/profile_step.py --shape qwen1.5b --batch 64 --context 32000 --q-len 5 \
                --verify specattn-y/blk64 --top 10 --json "$OUT/profile_qwen_verify_b64.json" 2>&1 \
                | grep -v -i warn | tail -12
              timeout 200 python3 benchmarks/tune_attention.py --splits --names=h2x6 --stages=2,3 --warps=4,8 \
                --blocks=128,256 "$OUT/tune_splits_qwen_draft.json" 2>&1 | grep -v -i warn | tail -3 ;;
    finish-by-block)   # block mass finished per block (MASS_FINISH_BY_BLOCK) against per page (variant
              # block64_finished_per_page), one layer with its finishing launch, per kernel: the 1.5B's heads at b64 x
              # 32K and the default model's at b64 x 8K, 5 rows (no model files)
              timeout 150 python3 benchmarks/verify_cost.py --cells 64x32000 --q-lens 5 --kernels \
                --out "$OUT/verify_cost_finish_qwen.json" 2>&1 | grep -v -i warn | tail -1 | cut -c1-2000
              timeout 100 python3 benchmarks/verify_cost.py --cells 64x8000 --heads 3,3,64 --q-lens 5 --kernels \
                --out "$OUT/verify_cost_finish_smol.json" 2>&1 | grep -v -i warn | tail -1 | cut -c1-2000 ;;
    tail)   # a fixed batch's tail: verify steps with 64 / 16 / 4 / 1 sequences still generating, attention planned
              # for the whole batch vs for those left (runner.tail_plan), and a draft step (no model files)
              timeout 200 python3 benchmarks/tail_cost.py --shape qwen1.5b --batch 64 --context 32000 \
                --json "$OUT/tail_cost_qwen.json" 2>&1 | grep -v -i warn | tail -20
              timeout 120 python3 benchmarks/tail_cost.py --shape smol --batch 64 --context 8000 --draft-budget 512 \
                --json "$OUT/tail_cost_smol.json" 2>&1 | grep -v -i warn | tail -20 ;;
    tail-draft)   # draft-model speculation's tail: the 1.5B verifier's step and the 0.5B draft's 4 dense steps with
              # 32 / 8 / 2 / 1 of 32 sequences generating, planned for the whole batch vs for those left (no model files)
              timeout 240 python3 benchmarks/tail_cost.py --shape qwen1.5b --draft-shape qwen0.5b --batch 32 \
                --context 32000 --active 32,8,2,1 --methods draft-spec --draft-budget 0 \
                --json "$OUT/tail_cost_draft_qwen.json" 2>&1 | grep -v -i warn | tail -20 ;;
    verify-autotune)   # the 1.5B-shaped verify step with Inductor's autotuned GEMMs (320-row products) vs cuBLAS
              timeout 400 python3 benchmarks/profile_step.py --shape qwen1.5b --batch 64 --context 16000 --q-len 5 \
                --verify specattn-y/blk64 --compile-modes default,max-autotune-no-cudagraphs --rounds 3 --top 8 \
                --json "$OUT/profile_qwen_verify_autotune_b64.json" 2>&1 | grep -v -i warn | tail -24 ;;
    verify-cost)   # one layer's attention at the 1.5B's heads, b64 x 32K (1, 5 and 7 rows: 7 fill a 64-row tile, read
              # in 32-key tiles), and at 8-head groups (5 rows = 40): plain vs page mass vs block mass vs block mass
              # with and without the 128-register cap of its 64-row tiles (block64_uncapped: 132 registers offline, 3 a SM)
              timeout 200 python3 benchmarks/verify_cost.py --q-lens 1,5,7 --warps auto,4/64 \
                --out "$OUT/verify_cost_qwen.json" 2>&1 | tail -7
              timeout 150 python3 benchmarks/verify_cost.py --cells 16x16000 --heads 8,8,128 --q-lens 5 \
                --warps auto,4/64 --out "$OUT/verify_cost_g8.json" 2>&1 | tail -3 ;;
    dot-gemm)   # tensor-core tiles for the default model's batched products (32, 64, 128 rows: draft steps at b32 /
              # b64, first draft step at b64) against cuBLAS; then draft steps with the winners (model.GEMV_MAX_ROWS
              # 128, fused rotation and SwiGLU) against cuBLAS, round-robin (no model files)
              timeout 260 python3 benchmarks/tune_gemv.py "$OUT/tune_gemv_dot.json" --shapes=smol --rows=${DOT_ROWS-32,64,128} \
                --tilings-out="$OUT/gemv_dot_tilings.json" 2>&1 | grep "^smol"
              for b in ${DOT_BATCHES-64 32}; do
                SPECATTN_GEMV_DOT_TILINGS="$OUT/gemv_dot_tilings.json" timeout 120 python3 benchmarks/profile_step.py \
                  --shape smol --batch $b --draft-budget 512 --gemv-rows 2,128 --rounds 5 --top 8 \
                  --json "$OUT/profile_dot_gemm_draft_b$b.json" 2>&1 | grep -A 3 "round-robin"
              done
              mkdir -p /root/m && cp "$OUT/gemv_dot_tilings.json" /root/m/ ;;   # for selfspec-dot on this machine
    selfspec-gamma)   # longer drafts at today's step costs: gamma 4, 6, 8 (GAMMAS) at b32 / b64 x 8K, each run its AR
              for g in ${GAMMAS-4 6 8}; do
                timeout 190 python3 benchmarks/selfspec.py --cells 32x8000,64x8000 --sampling-cells "" --budgets 512 \
                  --methods magicdec,specattn-y/blk64 --gamma $g --skip-8b --out "$OUT/selfspec_g$g.json" 2>&1 \
                  | grep -v -i warn | tail -5
              done ;;
    selfspec-dot)   # the same at gamma 4 with steps of up to 128 rows on the tensor-core small-step kernels, tiled as
              # dot-gemm found on this machine (/root/m/gemv_dot_tilings.json): AR's steps and the drafts alike
              SPECATTN_GEMV_MAX_ROWS=128 SPECATTN_GEMV_DOT_TILINGS=/root/m/gemv_dot_tilings.json timeout 190 \
                python3 benchmarks/selfspec.py --cells 32x8000,64x8000 --sampling-cells "" --budgets 512 \
                --methods magicdec,specattn-y/blk64 --gamma 4 --skip-8b --out "$OUT/selfspec_dot.json" 2>&1 \
                | grep -v -i warn | tail -5 ;;
    draft-kernel)   # a sparse draft step's blocks in one persistent launch (kernels.draft_step): checked against the
              # model's blocks first (the grid barrier runs only here), then timed round-robin against the library's
              # launches at b64 / b32 (no model files)
              timeout 150 python3 benchmarks/draft_kernel_check.py --batches 64,32 --repeats 30 \
                --sweep "${DRAFT_SWEEP-|splits=2|block_m=32|block_keys=128|num_stages=3}" \
                --out "$OUT/draft_kernel_check.json" 2>&1 | grep -v -i warn | tail -14
              for b in ${DRAFT_BATCHES-64 32}; do
                timeout 150 python3 benchmarks/profile_step.py --shape smol --batch $b --draft-budget 512 \
                  --draft-kernel off,on --rounds 5 --top 8 --json "$OUT/profile_draft_kernel_b$b.json" 2>&1 \
                  | grep -E "^==|round-robin|us \(first" | tail -6
              done ;;
    selfspec-draft-kernel)   # the real model with its draft steps in one launch, beside the same methods without
              for on in 0 1; do
                SPECATTN_DRAFT_STEP_KERNEL=$on timeout 190 python3 benchmarks/selfspec.py --cells 32x8000,64x8000 \
                  --sampling-cells "" --budgets 512 --methods magicdec,specattn-y/blk64 --gamma 4 --skip-8b \
                  --out "$OUT/selfspec_draft_kernel_$on.json" 2>&1 | grep -v -i warn | tail -5
              done ;;
    *)        echo "unknown part $part (see the case labels in scripts/gpu_agenda.sh)" >&2 ;;
  esac
done
