#!/usr/bin/env bash
# Compile every Triton kernel of fastnca for sm_90 without a GPU, over a matrix of rules,
# attention shapes, dtypes and opt-in modes (scripts/triton_sm90_resources.py, one process
# a case, since the knobs are read when a kernel is first compiled). One line a case: "ok"
# with its kernels' spill stacks in bytes, or "FAIL" and the error's tail. Exit status 1 if
# any case failed. Run it with each Triton a GPU machine may have before a GPU session, so
# that device minutes are not spent on compile errors:
#   PY=/path/to/venv-with-triton-3.6/bin/python scripts/triton_sm90_matrix.sh > matrix.log
# Seen (2026-11-28, 2 shared cores): 120 cases, about 25 minutes; every case compiles with
# triton 3.0, 3.6 and 3.9 (the Med-NCA rule's default bfloat16 backward cell kernel spills
# 672 bytes with 3.6 and 3.9). The 4 fwd-hchunk cases, added later (124 in all), compile with
# 3.0, 3.6 and 3.9 (checked on their own, with float16 too).
# Each nca rule also runs with WALK=listed (the backward's two walks, session 23): 148 cases.
# Triton 3.7.1 (torch 2.13's pin; 2026-11-28, a subset: the whole matrix would take hours
# beside other jobs): the Med-NCA rule in bfloat16 and float16, channels_last, in every
# backward mode and walk and with fp32 weights, NCHW in the default mode, the depthwise
# rule, and GeCA-S attention in every formulation all compile.
# The "resident" cases are gone with that mode (session 25): 144 cases.
# Register caps (session 26): 8 more, 152 cases; all 8 compile with triton 3.0, 3.6 and 3.7.
# Rules: B,C,H,W,hidden,F,groups,frozen; attention: B,H,W,heads,D,kernel_size,border.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v python3 || command -v python)}
rules="8,32,64,64,128,2,1,1 8,16,64,64,128,1,16,0 2,128,16,16,256,3,1,0 1,1,8,8,1,1,1,0 1,3,9,9,5,2,3,1
       2,17,11,13,33,3,1,3 2,64,16,16,64,1,1,0 1,20,8,8,40,25,20,2"
attention="32,32,32,12,64,3,zeros 8,32,32,6,64,3,mask 2,17,19,4,32,5,circular 2,16,16,2,16,7,shift
           1,9,9,3,1,3,zeros 1,12,12,2,128,3,mask 1,12,12,2,80,5,zeros 1,8,8,1,3,3,shift"
wide="8,32,64,64,128,2,1,1 8,16,64,64,128,1,16,0 2,128,16,16,256,3,1,0 1,3,9,9,5,2,3,1"
failed=0

case_() {  # case_ LABEL [VAR=VALUE...] ARG
  local label=$1 out rc
  shift
  out=$(env "$@" 2>&1)
  rc=$?
  if [[ $rc -ne 0 ]] || grep -q -i -E "error|traceback" <<<"$out"; then
    echo "FAIL [$label] exit $rc"
    grep -v -i warn <<<"$out" | tail -6
    failed=1
  else
    echo "ok   [$label] $(grep -c REG: <<<"$out") kernels; $(grep -o 'STACK:[1-9][0-9]*' <<<"$out" | tr '\n' ' ')"
  fi
}
resources() { echo "$PY" scripts/triton_sm90_resources.py; }

for dt in float32 bfloat16 float16; do
  for r in $rules; do
    case_ "nca $r,$dt" $(resources) "$r,$dt"
    # states this small walk every cell in the backward (and forward); WALK=listed compiles
    # the large states' kernels, which walk the listed firing cells, on the same rule
    case_ "nca listed $r,$dt" WALK=listed $(resources) "$r,$dt"
  done
  for a in $attention; do
    case_ "na $a,$dt" $(resources) "na:$a,$dt"
    case_ "na halo $a,$dt" FASTNCA_TRITON_NA_FORWARD=halo FASTNCA_TRITON_NA_BACKWARD=halo $(resources) "na:$a,$dt"
  done
done
for mode in mixed memory gemm chunked; do
  for dt in float32 bfloat16; do
    for r in $wide; do case_ "nca acc=$mode $r,$dt" FASTNCA_TRITON_NCA_BWD_ACC=$mode $(resources) "$r,$dt"; done
  done
done
for dt in float32 bfloat16; do
  for r in 8,32,64,64,128,2,1,1 8,16,64,64,128,1,16,0; do
    case_ "nca fp32-weights $r,$dt" FASTNCA_TRITON_NCA_HALF_WEIGHTS=0 $(resources) "$r,$dt"
    case_ "nca tf32 $r,$dt" DOT_PREC=tf32 $(resources) "$r,$dt"
    case_ "nca channels_last $r,$dt" LAYOUT=channels_last $(resources) "$r,$dt"
    case_ "nca fwd-hchunk $r,$dt" FASTNCA_TRITON_NCA_FWD_HCHUNK=32 $(resources) "$r,$dt"
    # register caps (session 26): the forward's capped autotune candidate, and the caps
    # gpu_session.sh's variants pin on the cell (=gemm too) and input kernels
    case_ "nca regs $r,$dt" LAYOUT=channels_last FASTNCA_TRITON_NCA_FWD_HCHUNK=32 FASTNCA_TRITON_NCA_FWD_TILE=64,4,1,168 \
      FASTNCA_TRITON_NCA_BWD_TILE=16,8,1,128 FASTNCA_TRITON_NCA_BWD_INPUT_TILE=64,4,1,96 $(resources) "$r,$dt"
    case_ "nca regs gemm $r,$dt" LAYOUT=channels_last FASTNCA_TRITON_NCA_BWD_ACC=gemm \
      FASTNCA_TRITON_NCA_BWD_TILE=16,4,1,128 $(resources) "$r,$dt"
  done
done
exit $failed
