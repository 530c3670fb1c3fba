"""Train and evaluate CF-MoE for multimodal sentiment (negative / neutral / positive).

    accelerate launch examples/run_sentiment.py --output_dir out               # tiny model, synthetic data
    accelerate launch examples/run_sentiment.py --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --dataset mvsa_single --data_dir /data/MVSA_Single --output_dir out
"""

from trainer.run import main

if __name__ == "__main__":
    main(task="sentiment")
