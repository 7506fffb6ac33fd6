"""Train a reconstruction method: python train.py [method=...] [task=...] [solver=...] [backward=...] [data=...]"""
from jfb_ip.train import main

if __name__ == "__main__":
    main()
