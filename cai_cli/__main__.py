from cai_cli.cli import main

# The guard matters: vLLM starts its worker processes with spawn, which imports this module again.
if __name__ == "__main__":
    main()
