"""The offline end-to-end GAP demo behind `make demo`, and its study (`--study`): see `trainers/demo.py`.

    python recipes/demo.py [--study] [--output_dir DIR] [--seeds 0 1 2] [--budgets 100 200 400] [--threads 1]
"""

from trainers.demo import main

if __name__ == "__main__":
    main()
