#!/usr/bin/env bash
# BinaryViT on ImageNet-1k, DeiT-S: full-precision teacher -> binary + GRS + ASM (soft KD).
#
#   DATA=/path/to/imagenet bash scripts/imagenet/binaryvit_deit_s.sh        (settings: common.sh)
#
# The BinaryViT paper (Xiao et al. 2023, arXiv 2305.14730) was withdrawn with only its abstract left:
# it gives no training settings. Everything but "DeiT-S on ImageNet, binary + GRS + ASM" is ours:
# - teacher: DeiT's DeiT-S recipe (Touvron et al. 2021, Table 9 / main.py): 300 epochs, global batch
#   1024, AdamW lr 5e-4 * 1024/512 = 1e-3, weight decay 0.05, 5 warm-up epochs, cosine to 1e-5,
#   drop-path 0.1, label smoothing 0.1, RandAugment m9, mixup 0.8 / cutmix 1.0, random erasing 0.25,
#   no gradient clipping. (DeiT's repeated augmentation is not in minibvit; DeiT's Table 9 has no EMA.)
# - binary stage (OUR CHOICE): 300 epochs from the teacher, the same augmentation, lr 5e-4 (half the
#   teacher's: the latent weights start trained), weight decay 0 (decay pulls the latent weights to 0,
#   where their signs oscillate: the opposite of GRS), clipping at 5 (minibvit's default), soft KD with
#   minibvit's default alpha/temperature, GRS lambda 0.01 (l2), ASM with running-mean centres
#   (the median gathers every row across ranks: docs/scaling.md).
RECIPE=binaryvit_deit_s
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
TEACHER_EPOCHS=${TEACHER_EPOCHS:-300}
EPOCHS=${EPOCHS:-300}

estimate binaryvit "teacher=$TEACHER_EPOCHS,binaryvit=$EPOCHS"

train --method fp --out "$OUT/teacher" --epochs "$TEACHER_EPOCHS" --batch-size 1024 --lr 1e-3 \
    --weight-decay 0.05 --warmup-epochs 5 --min-lr 1e-5 --drop-path 0.1 --label-smoothing 0.1 --clip-grad 0 \
    --rand-augment 2 --mixup 0.8 --cutmix 1.0 --random-erasing 0.25 --resume
train --method binaryvit --teacher "$OUT/teacher/fp/best.safetensors" --out "$OUT" --epochs "$EPOCHS" \
    --batch-size 1024 --lr 5e-4 --weight-decay 0 --warmup-epochs 5 --min-lr 1e-5 --drop-path 0.1 \
    --label-smoothing 0.1 --clip-grad 5 --rand-augment 2 --mixup 0.8 --cutmix 1.0 --random-erasing 0.25 \
    --grs-lambda 0.01 --grs-variant l2 --asm-center mean --resume
