from cai_cli.cli import main

main()
