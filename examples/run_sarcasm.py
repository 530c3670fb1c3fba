"""Train and evaluate CF-MoE for multimodal sarcasm detection.

    accelerate launch examples/run_sarcasm.py --output_dir out                 # tiny model, synthetic data
    accelerate launch examples/run_sarcasm.py --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --dataset mmsd2 --data_dir /data/MMSD2.0 --ood_file /data/dmsd_ood.txt --output_dir out
    python examples/run_sarcasm.py --help                                      # every argument
"""

from trainer.run import main

if __name__ == "__main__":
    main(task="sarcasm")
