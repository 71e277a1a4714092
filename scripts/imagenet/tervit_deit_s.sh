#!/usr/bin/env bash
# TerViT on ImageNet-1k, DeiT-S: full precision -> 8-bit (W8A8) -> ternary weights, A8 (progressive).
#
#   DATA=/path/to/imagenet bash scripts/imagenet/tervit_deit_s.sh           (settings: common.sh)
#
# TerViT (Xu et al. 2022, arXiv 2201.08050) has no public code; what we could read (its abstract) gives
# the progressive 8-bit -> ternary schedule and channel-wise ternarization, no hyper-parameters.
# - fp stage: DeiT's DeiT-S recipe (Touvron et al. 2021; see binaryvit_deit_s.sh), 300 epochs.
#   minibvit's tervit recipe reuses the finished <OUT>/fp stage.
# - 8-bit and ternary stages (OUR CHOICE): 150 epochs each (--stage-epochs), global
#   batch 1024, lr 5e-4 (each stage starts from trained weights), weight decay 0.05, 2 warm-up epochs,
#   cosine to 1e-5, DeiT's augmentation, clipping at 5 (minibvit's default), no distillation.
RECIPE=tervit_deit_s
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
FP_EPOCHS=${FP_EPOCHS:-300}
EPOCHS=${EPOCHS:-150}

estimate tervit "fp=$FP_EPOCHS,tervit_w8a8=$EPOCHS,tervit=$EPOCHS"

train --method fp --out "$OUT" --epochs "$FP_EPOCHS" --batch-size 1024 --lr 1e-3 \
    --weight-decay 0.05 --warmup-epochs 5 --min-lr 1e-5 --drop-path 0.1 --label-smoothing 0.1 --clip-grad 0 \
    --rand-augment 2 --mixup 0.8 --cutmix 1.0 --random-erasing 0.25 --resume
train --method tervit --out "$OUT" --epochs "$EPOCHS" --stage-epochs "tervit_w8a8=$EPOCHS,tervit=$EPOCHS" \
    --batch-size 1024 --lr 5e-4 \
    --weight-decay 0.05 --warmup-epochs 2 --min-lr 1e-5 --drop-path 0.1 --label-smoothing 0.1 --clip-grad 5 \
    --rand-augment 2 --mixup 0.8 --cutmix 1.0 --random-erasing 0.25 --resume
