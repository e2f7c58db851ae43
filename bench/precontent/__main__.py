"""`python -m bench.precontent`: run the probes, write results.json, print it."""
import atexit, json, os, signal, sys, time
from bench.precontent.acceptance import acceptance
from bench.precontent.correctness import correctness
from bench.precontent.harness import ROOT, cleanup, setup
from bench.precontent.latency import fuse_server, latency_fanotify, latency_fuse


def main():
    if len(sys.argv) > 1 and sys.argv[1] == 'fuse-server':
        fuse_server(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=500)
    ap.add_argument('--fuse-python', default=sys.executable)
    ap.add_argument('--skip', default='', help='comma list: accept,correct,latfan,latfuse')
    ap.add_argument('--out', default=f'{ROOT}/results.json')
    a = ap.parse_args()
    skip = set(a.skip.split(',')) if a.skip else set()
    atexit.register(cleanup)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda *x: sys.exit(1))
    res = {'kernel': os.uname().release, 'fs_under_test': f'ext4 (loop-mounted image in {ROOT})'}
    setup(a.n)
    steps = [('accept', lambda: acceptance(res)), ('correct', lambda: correctness(res)),
             ('latfan', lambda: latency_fanotify(res, a.n)), ('latfuse', lambda: latency_fuse(res, a.n, a.fuse_python))]
    for name, fn in steps:
        if name in skip:
            continue
        t0 = time.time()
        try:
            fn()
        except Exception:
            import traceback
            res[f'{name}_error'] = traceback.format_exc()
        res.setdefault('step_seconds', {})[name] = round(time.time() - t0, 1)
        with open(a.out, 'w') as f:
            json.dump(res, f, indent=1)
    cleanup()
    print(json.dumps(res, indent=1))


if __name__ == '__main__':
    main()
