from fastdistill.run import main

main()
