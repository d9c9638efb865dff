from specdec.bench.bench_serving import main

if __name__ == "__main__":  # python -m specdec.bench_serving
    raise SystemExit(main())
