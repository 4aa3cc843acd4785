# Issue 17's spike-code screens, from the repository root, one at a time, each run with
#   OMP_NUM_THREADS=1 nice -n 10, on 2 CPU cores shared with six other engineers' jobs (load average 5-10).
# All three spike-driven sites on (as configs/cpu_proxy_spike_driven.yaml), 500 steps, seed 1337; the binary
# reference is issue 12's all_500 (../commands.sh, val 2.470).
R=eval/results/spike_driven/runs
S="--config configs/cpu_proxy_spiking.yaml"
ALL="--model.gpt.spiking_qkv_in true --model.gpt.spiking_proj_in true --model.gpt.spiking_fc_in true"
M5="--trainer.max_steps 500"   # the 500-step screens
fit() { n=$1; shift; nice -n 10 spiking-lm fit "$@" --trainer.default_root_dir $R/$n --trainer.logger.init_args.save_dir $R/$n; }
# the same neuron settings at qkv_in, proj_in and fc_in: sites code=signed gradient=straight_through
sites() { for s in qkv_in proj_in fc_in; do for kv in "$@"; do printf -- "--model.gpt.${s}_neuron.%s " "${kv/=/ }"; done; done; }
fit signed_st_500 $S $ALL $(sites code=signed gradient=straight_through) $M5
fit graded_st_500 $S $ALL $(sites code=graded gradient=straight_through) $M5
fit graded_st_r0_lr_500 $S $ALL $(sites code=graded gradient=straight_through refractory=0) --model.optim.neuron_lr 0.01 $M5
# Session of 2026-12-06 (same machine; up to three runs at a time): the finalist at 2,000 steps on two seeds, and
# screens of the gradient estimator, the MLP threshold, the site thresholds and spiking Q/K/V on the graded code.
G="$S $ALL $(sites code=graded gradient=straight_through)"
fit graded_st_2000 $G
fit graded_st_2000_seed1338 $G --seed_everything 1338
fit graded_sg_500 $S $ALL $(sites code=graded gradient=surrogate) $M5
fit graded_st_mlp05_500 $G --model.gpt.mlp_neuron.threshold 0.5 $M5
fit graded_st_thr05_500 $G $(sites threshold=0.5) $M5
fit graded_st_qk_500 $G --model.gpt.spiking_qkv true $M5
# then, as the surrogate screen came out ahead of the straight-through one, the surrogate at 2,000 steps
fit graded_sg_2000 $S $ALL $(sites code=graded gradient=surrogate)
# Session of 2026-12-06, second half (up to four runs at a time): screens on the graded code with the surrogate
# (refractory 0, finer resolution, learned amplitude, lr 2e-3, distillation from softmax_2000 and the site
# curriculum), then the finalist at 2,000 steps on two seeds and with spiking Q/K/V.
fit softmax_2000 --config configs/cpu_proxy_softmax.yaml   # the distillation teacher
GS="$S $ALL $(sites code=graded gradient=surrogate)"
KD="--model.distill.teacher $R/softmax_2000/checkpoints/last.ckpt --model.distill.weight"
fit graded_sg_r0_500 $GS $(sites refractory=0) $M5
fit graded_sg_fine_500 $GS $(sites threshold=0.5 max_count=7) $M5
fit graded_sg_r0_amp_500 $GS $(sites refractory=0 amplitude=true) $M5
fit graded_sg_r0_lr2_500 $GS $(sites refractory=0) --model.optim.lr 2.0e-3 --model.optim.min_lr 2.0e-4 $M5
fit graded_sg_kd_500 $GS $KD 0.5 $M5
fit graded_sg_kdt2_500 $GS $KD 0.5 --model.distill.temperature 2.0 $M5
fit graded_sg_kd9_500 $GS $KD 0.9 $M5
fit graded_sg_kd_cur250_500 $GS $KD 0.5 --model.curriculum.sites_from_step 250 $M5
MS="$GS $KD 0.9 --model.curriculum.sites_from_step 1000"  # the milestone configuration
fit graded_sg_kd9_cur1000_2000 $MS
fit graded_sg_kd9_cur1000_2000_seed1338 $MS --seed_everything 1338
fit graded_sg_kd9_cur1000_qk_2000 $MS --model.gpt.spiking_qkv true
# then, the curriculum without distillation, and the milestone configuration with the rate regulariser
fit graded_sg_cur250_500 $GS --model.curriculum.sites_from_step 250 $M5
fit graded_sg_kd9_cur1000_reg1_2000 $MS --model.firing.reg_weight 1.0 --model.firing.target 0.0
# Session of 2026-12-06 (third): the rate frontier of the milestone configuration at lambda 0.3 and 0.6, and the
# curriculum holding the Q/K/V neurons off too (curriculum.sites), with spiking Q/K/V.
fit graded_sg_kd9_cur1000_reg03_2000 $MS --model.firing.reg_weight 0.3 --model.firing.target 0.0
fit graded_sg_kd9_cur1000_reg06_2000 $MS --model.firing.reg_weight 0.6 --model.firing.target 0.0
fit graded_sg_kd9_cur1000_qkcur_2000 $MS --model.gpt.spiking_qkv true --model.curriculum.sites "[qkv_in, qkv, proj_in, fc_in]"
# then lambda 0.1 on two seeds
fit graded_sg_kd9_cur1000_reg01_2000 $MS --model.firing.reg_weight 0.1 --model.firing.target 0.0
fit graded_sg_kd9_cur1000_reg01_2000_seed1338 $MS --model.firing.reg_weight 0.1 --model.firing.target 0.0 --seed_everything 1338
# Session of 2026-12-06 (fourth): lambda 0.2 on two seeds, run from a worktree at b073182
fit graded_sg_kd9_cur1000_reg02_2000 $MS --model.firing.reg_weight 0.2 --model.firing.target 0.0
fit graded_sg_kd9_cur1000_reg02_2000_seed1338 $MS --model.firing.reg_weight 0.2 --model.firing.target 0.0 --seed_everything 1338
