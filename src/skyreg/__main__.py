from skyreg.cli.main import main

main()
