from tokenbridge.cli.main import main

main()
