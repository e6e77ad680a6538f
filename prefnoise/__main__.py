from prefnoise.cli import main

main()
