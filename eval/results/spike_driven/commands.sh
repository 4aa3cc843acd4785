# The runs of this folder, from the repository root; each was run with
#   OMP_NUM_THREADS=1 nice -n 5, at most two at a time, on 2 CPU cores shared with other jobs.
R=eval/results/spike_driven/runs
S="--config configs/cpu_proxy_spiking.yaml"
ALL="--model.gpt.spiking_qkv_in true --model.gpt.spiking_proj_in true --model.gpt.spiking_fc_in true"
M5="--trainer.max_steps 500"   # the 500-step screens
T="--model.distill.teacher $R/softmax_2000/checkpoints/last.ckpt --model.distill.weight 0.5"
fit() { n=$1; shift; spiking-lm fit "$@" --trainer.default_root_dir $R/$n --trainer.logger.init_args.save_dir $R/$n; }
fit softmax_2000 --config configs/cpu_proxy_softmax.yaml
fit default_2000 $S
fit all_2000 $S $ALL                     # = configs/cpu_proxy_spike_driven.yaml
fit default_500 $S $M5
fit qkv_in_500 $S --model.gpt.spiking_qkv_in true $M5
fit fc_in_500 $S --model.gpt.spiking_fc_in true $M5
fit proj_in_500 $S --model.gpt.spiking_proj_in true $M5
fit all_500 $S $ALL $M5
fit all_reg0.3_500 $S $ALL --model.firing.reg_weight 0.3 --model.firing.target 0 $M5
fit all_reg3_500 $S $ALL --model.firing.reg_weight 3 --model.firing.target 0 $M5
fit default_distill_500 $S $T $M5
fit all_distill_500 $S $ALL $T $M5
