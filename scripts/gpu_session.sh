#!/usr/bin/env bash
# What a session with a lent GPU runs, in the order the project asks for, in as few device
# calls as possible (the device time is short: 15 minutes a session, 10 a call):
#   build     fastnca._C_cuda in place, for this GPU's architecture only (fastnca._C after it)
#   test      pytest -m gpu: every CUDA and Triton kernel against the reference on the GPU
#   sanitize  scripts/sanitize_cuda.sh: compute-sanitizer memcheck, racecheck, initcheck, synccheck
#   bench     fastnca bench --json: every op and model against PyTorch on this GPU
# Logs and benchmark JSON go to $OUT (the device tool's return folder) or, without it,
# build/gpu-session/. On a copied tree without .git, set FASTNCA_GIT_COMMIT so the JSON
# names the commit it measured, and FASTNCA_GIT_DIRTY=0 (a clean tree: `git status
# --porcelain --untracked-files=no` prints nothing) or 1, or the JSON says unknown.
#
# Usage: scripts/gpu_session.sh STAGE...   (default: build test sanitize bench)
#   STAGE: build (fastnca._C_cuda; fastnca._C goes on in the background) | build-cpu (waits
#          for it) | test | test-cuda | test-triton | sanitize[:TOOL,...] | sanitize-triton[:TOOL,...]
#          | bench[:OPS[:DTYPES]] | bench-warm[:OPS[:DTYPES]] | bench-quick (BENCH_IMPLS=A,B: only
#          the implementations whose names contain A or B, and each suite's baseline;
#          BENCH_VARIANTS=1: also the opt-in formulations' rows, fastnca bench --variants)
#          | ncu:OP:BACKEND[:DTYPE] (Nsight Compute of one fwd+bwd, OP nca|attention)
#          | ncu-source:OP:BACKEND[:DTYPE] (warp-stall samples per source line of the op's kernels)
#          | timeline:OP:BACKEND[:DTYPE] (wall vs kernel vs host time per fwd+bwd, torch.profiler)
#          | variants (scripts/nca_backward_variants.py --rollout $VARIANTS_ARGS: backward tiles,
#          accumulators, TF32 vs 3xTF32, and a 64-step rollout per backend) | pack
#          (OPS, DTYPES: comma lists; bench-warm runs everything once to fill the compile
#          caches, so that a timed bench after it spends its time measuring)
#   STAGE@SECONDS  stops that stage after SECONDS (what it wrote so far stays: the benchmark
#                  rewrites its JSON, marked partial, before each new measurement)
#   A+B            runs stages A and B at the same time (tests beside the sanitizer and a
#                  cache warm-up: Triton compiles are CPU-bound, the sanitizer waits on the GPU)
#   pack           tars every log into $OUT/logs.tgz (the device tool returns 8 files at most)
# Example, everything in one ten-minute call:
#   scripts/gpu_session.sh build test@240+sanitize:memcheck,racecheck@240+bench-warm:nca@240 \
#       bench:nca:bfloat16@120 pack
# Next planned calls (after the sixth run, H100, dd6c6c4; written 2026-11-27). No benchmark
#       JSON since 220af96: the host-path changes since are untimed, and so are the attention
#       window kernels of session 12 (one row a thread, bfloat16 word loads, int32 offsets,
#       unmasked loads: sm_90 SASS GeCA-S bf16 forward 1752 -> 1256 instructions, backward
#       2112 -> 1768; compare with the H100 attention rows of h100-bf1a97b-attention-nca-
#       bf16.json), bfloat16 dots as the nca default and the bfloat16 dQ workspace (rows
#       "fp32-dq" and "no-bf16-dots fp32-dq", the old default, in the same run). The GPU
#       tests include test_gpu_half_dq_workspace; the unmasked attention loads would show
#       as memcheck errors if a clamp were missed. Call 1 (the warm-up
#       beside the tests: both compile on the CPU, 16 cores):
#         BENCH_IMPLS="compile,fastnca:triton" scripts/gpu_session.sh build@100 \
#             test@300+sanitize:memcheck,racecheck@240+bench-warm:nca,attention:bfloat16@300 pack
#       then at once, on the still-warm machine and WITHOUT carry (build outputs and Triton
#       caches stay between calls on a warm machine; a carried path that the local checkout
#       lacks is deleted there, which cost the sixth run its _C_cuda):
#         BENCH_IMPLS="compile,fastnca:triton" scripts/gpu_session.sh \
#             bench:nca,attention:bfloat16@250 timeline:nca:triton@50 timeline:attention:triton@40 pack
#       (about 420 + 360 s with the starts; the timelines also list each kernel's GPU time)
#       (the timelines for the eager host gap: Triton nca fwd+bwd 5.1 ms eager against 2.95
#       replayed from a graph on the H200, attention ~1.2 ms of host per fwd+bwd). If a
#       machine was given back, copy the .so from files_at into python/fastnca/ first, then
#       carry it. Then, if time is left, the resident kernels on 8 warps (at 16,4 one block
#       of 4 warps held an SM's shared memory; resident now takes 16,8: sm_90 compile 234
#       registers, no spills) against staged 16,4 and 16,8, and the rollout ranking of the
#       opt-in modes, now in interleaved rounds: VARIANTS_ARGS="--tiles default 16,8 16,4
#       --acc default gemm --weights staged resident --prec tf32x3 --no-cuda --rounds 3"
#       scripts/gpu_session.sh variants@240 pack.
#     Added in session 13 (2026-11-27, untimed): the backward's gradient-only products in one
#       TF32 product for bfloat16 rules (default; row "split-bwd" is the old split), a
#       bfloat16 weight copy for the bfloat16 dots, with an im2col conv (opt-in; row
#       "half-weights"; sm_90 forward -17%, default cell kernel -24% instructions), and under
#       =gemm a cell kernel in hidden chunks on 64-row tiles (row "gemm"; sm_90 ~half the
#       instructions a cell of the default kernel), and =chunked, that kernel with its
#       weight-gradient partials in memory (row "chunked"; no workspace, so it could become
#       the default within the rollout's memory bound). The GPU tests add
#       test_gpu_bwd_tf32_products, test_gpu_half_weight_copy and
#       test_gpu_gemm_hidden_chunk_tiles (gemm and chunked at five tiles; =chunked
#       transposes a wgmma-output dz, the pattern of a Hopper miscompile, fla #640).
#     SO THE SECOND CALL CHANGES: the variants decide the defaults, and 15 device minutes do
#       not hold call 1, the bench and the variants. Call 2 (warm machine, no carry), the
#       variants first (kernels alone and 64-step rollouts, interleaved rounds), then as much
#       of the bench as fits (its rows come most wanted first):
#         VARIANTS_ARGS="--variant default:default:default default:default:split-bwd
#         default:default:half-weights 64,4:chunked:default 32,4:chunked:default
#         128,8:chunked:default 64,4:gemm:default 32,4:gemm:default 64,4:chunked:half-weights
#         --no-cuda --rounds 3" BENCH_IMPLS="compile,fastnca:triton,fastnca:cuda" scripts/gpu_session.sh \
#             build-cpu variants@200 bench:attention:bfloat16@60 bench:nca:bfloat16@170 \
#             timeline:attention:triton@40 pack
#       (the attention first and apart: the nca suite alone ran past 140 s and was cut;
#       build-cpu waits for call 1's background build of fastnca._C, which would otherwise
#       share the CPU with the host-bound eager rows)
#       Make the winner the default only if it wins both the kernels and the rollout rows.
#     Added in session 16 (untimed): the CUDA attention kernels rewritten (a warp on 8
#       queries at D=64 instead of 1, 16-byte row loads, 32-bit index decoding), and the CUDA
#       nca backend refuses rules its backward's shared memory cannot hold. Call 1's tests
#       and memcheck cover them (test_gpu_attention_*: a misaligned vector load would show
#       as a memcheck error); call 2's BENCH_IMPLS above includes fastnca:cuda for them,
#       and, if a minute is left, ncu:attention:cuda@60 shows what bounds them now (ncu-source's CUDA kernel names
#       were the launchers' names, which match no kernel: fixed in session 16).
#     Added in session 18 (one kernel change: the opt-in halo attention's zeros border gives
#       outside keys logit 0, not q . 0, which was NaN beside an infinite query; test
#       test_halo_forward_infinite_logits). New tests that call 1's `pytest -m gpu` run on
#       the GPU backends too: attention inputs each in its own dim order, logits in the hundreds,
#       inf/NaN in half inputs, half outputs within an ulp of float64 (test_neighborhood_attention.py);
#       the benchmark's FLOP count now credits fc2 with C - frozen rows (69376 a Med-NCA cell, not
#       69632), so compare roof fractions with older JSON at that 0.4%.
#     Session 19 (2026-11-28, no GPU, no kernel change): scripts/triton_sm90_matrix.sh, 120
#       cases (every rule shape, dtype, attention border and opt-in mode), compiles for sm_90
#       with triton 3.0, 3.6 (the lent machines') and 3.9; so call 1 should meet no compile
#       error. New CPU (interpreter) tests run =chunked / =gemm at GPU tiles over several
#       tiles a program (test_hidden_chunk_kernel_over_tiles_and_batch_chunks).
#     Session 20 (2026-11-28, no GPU, no GPU kernel change): torch 2.4-2.7 fixes in the Python
#       layer (grid-size limits are not checked under torch.compile; FASTNCA_BACKEND read as a
#       trace-time constant); new Triton attention tests from a mutation review, which run
#       on the GPU's device too (halo strides, grad_o alignment, half gradients rounded once,
#       a two-column-tile case); new CUDA emulation tests (CPU only); CMake without
#       find_package(CUDAToolkit) (build checked for sm_90 on the CPU machine).
#     (the precision "half-weights" above is the default now; nca_backward_variants.py
#       refuses the name: "fp32-weights" is the old default)
#     Session 21 (2026-11-28, H200, 15 device minutes): the seventh run, at 109ac01, did call 1
#       and the variants (benchmarks/README.md, "Seventh GPU run"): 808 GPU tests passed, 2
#       failed (opt-in tiles, since refused / reported), sanitizer clean, partial benchmark
#       JSON; half weights became the default. Next: the host path (2.5 ms of host work a
#       Triton step against 1.8 ms of kernels): timeline:nca:triton before and after, and the
#       model suites (mednca, geca), never run on the H200. Call 1 as above took 539 s of
#       its 585 (the nca bench was cut at 120 s after the depthwise =gemm row), the variants
#       71 s; a warm machine is given back after 30 s idle. Since then `fastnca bench` times
#       the opt-in rows only with --variants (BENCH_VARIANTS=1 here); this script set
#       TRITON_CACHE_AUTOTUNING=1 from then until session 27, which turned it off again (picks
#       made beside the tests). Plan for the next lent GPU, call 1 (~540 s):
#         scripts/gpu_session.sh build@100 test@280+sanitize:memcheck,racecheck@240+bench-warm:nca,attention,mednca,geca:bfloat16@280 \
#             bench:nca,attention:bfloat16@150 pack
#       (the tests include the =gemm half-state fallback and the pinned-tile errors, untested
#       on a GPU), then on the warm machine at once (~250 s):
#         VARIANTS_ARGS="--variant default:default:default default:default:fp32-weights 64,4:chunked:default
#         32,4:chunked:default --no-cuda --rounds 3" scripts/gpu_session.sh variants@120 \
#             timeline:nca:triton@30 bench:mednca,geca:bfloat16@120 pack
#       (the 64-step rollout is kernel-bound, ~1.9 ms of kernels a step against ~2.2 ms:
#       the backward kernels decide issue 3; =chunked with half weights and the new fold
#       of the weight-gradient partials are untimed)
#     Session 22 (2026-11-28, no GPU): one kernel change, opt-in: the forward in hidden chunks
#       (FASTNCA_TRITON_NCA_FWD_HCHUNK=32; variants row "triton fwd-hchunk 32" in the
#       rollouts, bench --variants row "fastnca:triton fwd-hchunk"). It adds a rollout row
#       and its forward autotune to call 2's variants: give that stage @120, not @90. The
#       rollout does two forwards a step (0.215 ms each in graph replay at 109ac01): a win
#       there of more than the rounds' spread makes it the default. New CPU tests from
#       mutation reviews (no GPU test changed).
#     Session 23 (2026-11-28, no GPU): the host path of small states. Below 131072 cells the
#       Triton backward walks every cell with the mask drawn in its cell and conv kernels
#       (no mask, cumsum, list or zero-fill launch), its two folds are one launch, and the
#       rollout's backward makes its plan once, and the kernels take 2 weight arguments, not
#       8 (Python a 64-step rollout 6.2 -> 2.7 ms on 2 CPU cores, Triton's launch path a
#       64x64 step 78 -> 60 us; scripts/host_cost.py). The Med-NCA training states
#       (B=8 x 64x64) take that walk; the benchmark's 256x256 steps keep the listed one (their kernels
#       unchanged but for a select). Both walks run in the GPU tests (test_gpu_shapes,
#       fixture `walk`). In call 2, add timeline:rollout:triton@40 (a 64-step rollout on
#       B=8 x 64x64: wall against kernel time) before the model suites; bench:mednca's
#       patch-64 row is the host-bound one (H100, bf1a97b: Triton 221 ms, eager 134).
#     Session 24 (2026-11-28, no GPU): two more attention autotune candidates a kernel, the
#       full tile on 4 warps (sm_90: forward 2 threads a query row, 21% fewer instructions a
#       row; backward 4 threads, 20% fewer, 141-144 registers). The timed bench autotunes,
#       and each Triton row's JSON now names what the autotuner picked (extra.tuned): read
#       it after call 1's bench:attention; if a 4-warp full tile wins, make it the default
#       (_default_config; the tests pin the default). The GPU tests add
#       test_autotuned_launch_records_its_pick, and the every-candidate test has 9 indices.
#     Session 25 (2026-11-28, no GPU): resident weights removed (lost on both GPUs). An
#       NCHW state's conv now takes the tap loop, not the im2col dot (sm_90 compiles: the
#       im2col gather spilled, forward 1592 bytes of stack with triton 3.7, torch 2.13's;
#       channels_last, the models' and the benchmark's layout, unchanged). The bench adds
#       the row "fastnca:triton nchw" after fastnca:triton: compare the two rows (the
#       GPU has triton 3.6, where the NCHW im2col forward spilled only 72 bytes). The GPU
#       tests run the half-weight test in both layouts. Call 2's VARIANTS_ARGS: add
#       16,8:default:default, default:mixed:default and default:memory:default (kernels
#       alone; cheap): the cell kernel's 16/4 register-partial tile was last compared with
#       them in 3xTF32 days (H100, bf1a97b and c849cdb: within noise). sm_90 compile now
#       (triton 3.6, Med-NCA bf16, channels_last; stack bytes / static SASS a thread):
#       registers 16/4 456 / 3000, 16/8 16 / 1776 (twice the warps), mixed 16/4 224 /
#       2680, mixed 16/8 0 / 1712, memory 16/4 0 / 2560 (but ~8 KB of partial traffic a cell).
#     Session 26 (2026-11-28, no GPU): register caps, opt-in. The tile knobs take a 4th field,
#       REGS (ptxas maxnreg: FASTNCA_TRITON_NCA_BWD_TILE=16,4,1,128); a capped persistent cell
#       kernel runs as many programs as the SMs hold. The forward's autotuner adds 64/4
#       capped at 168 for the hidden-chunk forward only (sm_90, triton 3.6: 209 -> 168
#       registers, no spill, 2 -> 3 blocks an SM); the variants' rollout row "triton
#       fwd-hchunk 32" tunes it, and the script now prints the forward's picks ("tuned").
#       Nsight Compute put these kernels at 12% occupancy, mostly idle (3a51e20). Call 2
#       changes: VARIANTS_ARGS adds 16,8,1,128:default:default (640 B of spill, 2 blocks of
#       8 warps), 16,4,1,128:gemm:default (272 B, 4 blocks) and default/64,4,1,96:default:default
#       (the input kernel at 96 registers: no spill, 5 blocks, not 4); and ncu-source:nca:triton
#       (warp stalls per source line, never run yet) takes timeline:nca:triton's place:
#         VARIANTS_ARGS="--variant default:default:default default:default:fp32-weights
#         64,4:chunked:default 32,4:chunked:default 16,8:default:default default:mixed:default
#         default:memory:default 16,8,1,128:default:default 16,4,1,128:gemm:default
#         default/64,4,1,96:default:default --no-cuda --rounds 3" scripts/gpu_session.sh \
#             variants@130 ncu-source:nca:triton@60 timeline:rollout:triton@30 \
#             bench:mednca,geca:bfloat16@100 pack
#       The rollouts add "triton input 64,4,1,96". A capped row that wins both the kernels
#       and the rollout becomes the default tile; the fwd-hchunk rollout's "tuned" line says
#       whether its forward took the cap.
# Seen on an H100 (2026-11-27, dd6c6c4): build 63 s; `pytest -m gpu` (712 tests) reached 83%
# in 220 s cold beside the sanitizer, the rest in 130 s warm; variants (8 kernel variants,
# 7 rollouts) 60 s; memcheck of the Triton kernels gave nothing in 170 s.
# Seen on an H100 (2026-11-26): build 55-130 s (nvcc, sm_90 only); `pytest -m gpu` 80-95 s on
# 10 processes (Triton compiles); memcheck + racecheck under 3 min beside it; warm-up of the
# nca and attention benchmarks 180 s; timed `bench:nca:bfloat16` over 140 s after the
# warm-up (cut there), `bench:attention:bfloat16` 33 s warm, 95 s cold. A machine starts
# in about 30 s.
# Tests run with FASTNCA_TRITON_AUTOTUNE=0 (one compile per variant, not one per tile) and
# on 10 processes (TEST_PROCS) when pytest-xdist is there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-session}
mkdir -p "$out/logs"
py=$(command -v python3 || command -v python)
export PATH="$(dirname "$py"):$PATH" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Triton's knob for keeping autotuning results on disk (newer releases) stays off unless
# exported: bench-warm runs beside the GPU tests and the sanitizer, so tiles it picked
# would be chosen on a shared GPU and reused untimed by the timed bench. bench-warm still
# fills the compile cache (every candidate compiled); the timed bench re-times the
# candidates, alone on the GPU, in its own warm-up.
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(build test sanitize bench)

run_stage() {  # run_stage NAME[:ARGS] SECONDS
  local spec=$1 limit=$2 name=${1%%:*} arg="" tmo=()
  [[ $spec == *:* ]] && arg=${spec#*:}
  [[ $limit -gt 0 ]] && tmo=(timeout -k 10 "$limit")
  local tag=${spec//[:,]/-}
  echo "=== $spec ($(date +%T), limit ${limit}s)"
  case "$name" in
    build)
      local arch
      arch=$("$py" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
      # _C_cuda first (what the GPU stages need); the CPU module, whose template-heavy
      # attention file and LTO link were the build's long pole on the H100 machine, goes on
      # in the background (wait for it with the build-cpu stage, or let it land meanwhile).
      FASTNCA_CUDA=on FASTNCA_CUDA_ARCHS="${FASTNCA_CUDA_ARCHS:-$arch}" JOBS="${JOBS:-$(nproc)}" TARGET=_C_cuda \
        "${tmo[@]}" scripts/build_inplace.sh build/gpu > "$out/logs/build.log" 2>&1 \
        || { tail -30 "$out/logs/build.log"; echo "build failed"; return 1; }
      FASTNCA_CUDA=on FASTNCA_CUDA_ARCHS="${FASTNCA_CUDA_ARCHS:-$arch}" JOBS=4 TARGET=_C \
        scripts/build_inplace.sh build/gpu > "$out/logs/build-cpu.log" 2>&1 &
      echo $! > "$out/logs/build-cpu.pid"
      "$py" -m fastnca.cli info 2>&1 | tee "$out/logs/info.txt"
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        >> "$out/logs/info.txt" 2>&1 ;;
    build-cpu)  # wait for the background build of fastnca._C
      local pid
      pid=$(cat "$out/logs/build-cpu.pid" 2>/dev/null) && while kill -0 "$pid" 2>/dev/null; do sleep 2; done
      ls python/fastnca/_C.*.so >/dev/null 2>&1 || { tail -20 "$out/logs/build-cpu.log"; return 1; } ;;
    test|test-cuda|test-triton)
      local files=() xdist=()
      [[ $name == test-cuda ]] && files=(tests/test_cuda_kernels.py)
      [[ $name == test-triton ]] && files=($(ls tests/test_*.py | grep -v test_cuda_kernels.py))
      "$py" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_PROCS:-10}")
      "$py" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout 150)  # a hung test fails alone
      FASTNCA_FAILURE_LOG="$out/logs/$name-failures.log" \
      FASTNCA_TRITON_AUTOTUNE=0 "${tmo[@]}" "$py" -m pytest -m gpu -v -rfE -p no:cacheprovider -p no:benchmark "${xdist[@]}" \
        --junitxml="$out/$name.xml" "${files[@]}" > "$out/logs/$name.log" 2>&1
      local rc=$?
      pkill -f execnet 2>/dev/null  # xdist workers a timeout left behind
      tail -25 "$out/logs/$name.log"
      return $rc ;;
    sanitize|sanitize-triton)
      local backend=cuda
      [[ $name == sanitize-triton ]] && backend=triton
      SANITIZE_BACKEND=$backend "${tmo[@]}" scripts/sanitize_cuda.sh ${arg//,/ } > "$out/logs/$name.log" 2>&1
      local rc=$?
      grep -E "^===|ERROR SUMMARY|RACECHECK SUMMARY|Error|error" "$out/logs/$name.log" | head -40
      return $rc ;;
    bench|bench-warm)
      local args=() o d
      [[ $name == bench ]] && args=(--json "$out/$tag.json") || args=(--warm-only)
      if [[ -n $arg ]]; then
        o=${arg%%:*}
        for o in ${o//,/ }; do args+=(--ops "$o"); done
        if [[ $arg == *:* ]]; then d=${arg#*:}; for d in ${d//,/ }; do args+=(--dtype "$d"); done; fi
      fi
      [[ -n ${BENCH_IMPLS:-} ]] && args+=(--impls "$BENCH_IMPLS")
      [[ ${BENCH_VARIANTS:-0} == 1 ]] && args+=(--variants)
      "${tmo[@]}" "$py" -m fastnca.cli bench "${args[@]}" > "$out/logs/$tag.log" 2>&1
      local rc=$?
      [[ $name == bench ]] && grep -E "^roofs|^    |error|Error" "$out/logs/$tag.log" | tail -60
      [[ $name == bench-warm ]] && tail -3 "$out/logs/$tag.log"
      return $rc ;;
    bench-quick)
      "${tmo[@]}" "$py" -m fastnca.cli bench --quick --json "$out/bench-quick.json" > "$out/logs/bench-quick.log" 2>&1 ;;
    variants)  # the nca backward kernels alone, per Triton tile and precision, beside CUDA
      "${tmo[@]}" "$py" scripts/nca_backward_variants.py --rollout ${VARIANTS_ARGS:-} 2>&1 | tee "$out/logs/$tag.log"
      return "${PIPESTATUS[0]}" ;;
    ncu)  # ncu:OP:BACKEND[:DTYPE] -- Nsight Compute sections of one fwd+bwd (scripts/profile_gpu.py)
      local ncu op backend dtype
      ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      [[ -n $ncu ]] || { echo "ncu not found"; return 2; }
      IFS=: read -r op backend dtype <<< "$arg"
      "${tmo[@]}" "$ncu" --profile-from-start off --csv --page details --print-units base \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        "$py" scripts/profile_gpu.py "${op:-nca}" --backend "${backend:-cuda}" --dtype "${dtype:-bfloat16}" \
        > "$out/logs/$tag.csv" 2> "$out/logs/$tag.err"
      local rc=$?
      "$py" scripts/profile_gpu.py --summarize "$out/logs/$tag.csv" | head -80
      return $rc ;;
    ncu-source)  # ncu-source:OP:BACKEND[:DTYPE] -- warp stalls per source line of each Triton/CUDA kernel
      local ncu op backend dtype kernels k rc=0
      ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      [[ -n $ncu ]] || { echo "ncu not found"; return 2; }
      IFS=: read -r op backend dtype <<< "$arg"
      # the first launch of each kernel of one fwd+bwd (the op's long-running ones)
      if [[ ${op:-nca} == nca ]]; then
        kernels="_nca_step_backward_cell_kernel _nca_step_backward_input_kernel _nca_step_backward_conv_kernel _nca_step_forward_kernel"
        [[ ${backend:-triton} == cuda ]] && kernels="nca_backward_main_kernel nca_conv_grad nca_state_grad_kernel nca_forward_kernel"
      else
        kernels="_na2d_backward_kernel _na2d_forward_kernel"
        [[ ${backend:-triton} == cuda ]] && kernels="na_backward_query_kernel na_backward_key_kernel na_forward_kernel"
      fi
      local -a names=($kernels)
      "${tmo[@]}" "$ncu" --profile-from-start off -k "regex:${kernels// /|}" --launch-count ${#names[@]} \
        --section SourceCounters --section WarpStateStats --import-source yes -f -o "$out/logs/$tag" \
        "$py" scripts/profile_gpu.py "${op:-nca}" --backend "${backend:-triton}" --dtype "${dtype:-bfloat16}" \
        > "$out/logs/$tag.err" 2>&1 || { tail -5 "$out/logs/$tag.err"; rc=1; }
      for k in $kernels; do
        "$ncu" -i "$out/logs/$tag.ncu-rep" -k "regex:$k" --page source --csv --print-source cuda \
          > "$out/logs/$tag-$k.csv" 2>> "$out/logs/$tag.err"
        echo "--- $k"
        "$py" scripts/profile_gpu.py --summarize-source "$out/logs/$tag-$k.csv" | head -32 || rc=1
      done
      return $rc ;;
    timeline)  # timeline:OP:BACKEND[:DTYPE] -- wall vs kernel vs host time (scripts/profile_gpu.py --timeline)
      local op backend dtype
      IFS=: read -r op backend dtype <<< "$arg"
      "${tmo[@]}" "$py" scripts/profile_gpu.py "${op:-nca}" --backend "${backend:-triton}" --dtype "${dtype:-bfloat16}" \
        --timeline 20 2>&1 | tee "$out/logs/$tag.txt"
      return "${PIPESTATUS[0]}" ;;
    pack)
      tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs" ;;
    *) echo "unknown stage: $spec" >&2; return 2 ;;
  esac
}

status=0
for stage in "${stages[@]}"; do
  IFS=+ read -ra parts <<< "$stage"
  specs=() limits=()
  for p in "${parts[@]}"; do
    if [[ $p == *@* ]]; then specs+=("${p%@*}"); limits+=("${p##*@}"); else specs+=("$p"); limits+=(0); fi
  done
  if [[ ${#specs[@]} -eq 1 ]]; then
    run_stage "${specs[0]}" "${limits[0]}" || status=1  # a failed build still leaves Triton to test
  else
    pids=()
    for i in "${!specs[@]}"; do
      run_stage "${specs[$i]}" "${limits[$i]}" > "$out/logs/stage-$i.out" 2>&1 & pids+=($!)
    done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; cat "$out/logs/stage-$i.out"; done
  fi
done
echo "=== done ($(date +%T)), status $status"
exit $status
