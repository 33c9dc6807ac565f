"""A model used from several threads, from its own progress callbacks, across fork(), and under Ctrl-C
(issue 6: item 2 the deadlock, item 4 the report-text race, and the fork and Ctrl-C should-fixes).

Every scenario runs in a fresh interpreter (isolated.run) with a timeout: a deadlock between the engine
and the GIL freezes every thread of its process, and would otherwise hang the test run rather than fail
it. The scenarios use a small network (feature_size 8, 12, 16, 24; hidden 32) on 16 x 16 x 32 inputs,
so most take about a second when nothing is wrong (the Ctrl-C ones need calls that last seconds).
"""
import textwrap

import isolated

# What every scenario below starts from: a model, an input, its logits, a second model's weights.
SETUP = """
m = DeformUXNet(**SMALL, seed=1)
x = np.random.default_rng(0).standard_normal((1, 1, 16, 16, 32)).astype(np.float32)
g = np.random.default_rng(1).standard_normal((1, 3, 16, 16, 32)).astype(np.float32)
want = m.forward(x)
other = DeformUXNet(**SMALL, seed=2)
want_other = other.forward(x)
assert not np.array_equal(want, want_other)
import atexit, shutil, tempfile
tmp = tempfile.mkdtemp()
atexit.register(shutil.rmtree, tmp, True)  # forked children leave with os._exit: only this process cleans
"""


def scenario(*parts, timeout=60):
    """Runs SETUP and `parts` (each dedented) in a fresh interpreter; the JSON its last line prints."""
    return isolated.last_json(isolated.run(SETUP + "".join(textwrap.dedent(p) for p in parts), timeout=timeout))


# ---- item 2: forward beside state_dict / load / save on one model ----

def test_reload_thread_beside_serving_forward_does_not_deadlock():
    """A serving thread runs forwards with a progress callback (the callback takes the GIL between the
    network's steps) while a reload thread reads and writes the same model's weights, its report text,
    summary and config in a loop. Before the fix the forward held the model's mutex while it called
    back and state_dict() waited for that mutex holding the GIL: the interpreter hung."""
    r = scenario("""
        path, path2 = os.path.join(tmp, "w.safetensors"), os.path.join(tmp, "w2.safetensors")
        m.save(path)
        sd = m.state_dict()
        counts = {"forward": 0, "progress": 0, "reload": 0}
        errors = []
        done = threading.Event()

        def progress(step, total):
            counts["progress"] += 1
            return True

        def serve():
            try:
                for _ in range(40):
                    y = m.forward(x, progress=progress)
                    if not np.array_equal(y, want):
                        errors.append("a forward during reloads gave other logits")
                    counts["forward"] += 1
            except BaseException as e:
                errors.append("serve: " + repr(e))
            finally:
                done.set()

        def reload():
            try:
                while not done.is_set() or counts["reload"] < 3:
                    # the same weights go back in, so every forward must give `want`
                    m.load_state_dict(m.state_dict())
                    m.load(path)
                    m.load_state_dict(sd)
                    m.save(path2)
                    m.summary(32)
                    m.config
                    repr(m)
                    counts["reload"] += 1
            except BaseException as e:
                errors.append("reload: " + repr(e))

        threads = [threading.Thread(target=serve), threading.Thread(target=reload)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps({"counts": counts, "errors": errors}))
    """)
    assert r["errors"] == []
    assert r["counts"]["forward"] == 40 and r["counts"]["progress"] == 40 * 12
    assert r["counts"]["reload"] >= 3


def test_reload_thread_beside_serving_backward_and_sessions_does_not_deadlock():
    """The same with a backward on the default session and forwards on a second session, while the
    reload thread also reads the gradients and the sessions' memory figures."""
    r = scenario("""
        counts = {"backward": 0, "forward": 0, "reload": 0}
        errors = []
        done = threading.Event()
        s = m.session()
        sd = m.state_dict()

        def train():
            try:
                for _ in range(8):
                    m.backward(x, g, progress=lambda step, total: True)
                    counts["backward"] += 1
            except BaseException as e:
                errors.append("train: " + repr(e))

        def serve():
            try:
                for _ in range(20):
                    if not np.array_equal(s.forward(x, progress=lambda step, total: True), want):
                        errors.append("a forward on the second session gave other logits")
                    counts["forward"] += 1
            except BaseException as e:
                errors.append("serve: " + repr(e))

        def reload():
            try:
                while not done.is_set() or counts["reload"] < 3:
                    m.load_state_dict(sd)
                    m.gradients()
                    m.summary(32)
                    s.retained_bytes
                    counts["reload"] += 1
            except BaseException as e:
                errors.append("reload: " + repr(e))

        workers = [threading.Thread(target=train), threading.Thread(target=serve)]
        r = threading.Thread(target=reload)
        for t in workers + [r]:
            t.start()
        for t in workers:
            t.join()
        done.set()
        r.join()
        print(json.dumps({"counts": counts, "errors": errors}))
    """)
    assert r["errors"] == []
    assert r["counts"]["backward"] == 8 and r["counts"]["forward"] == 20 and r["counts"]["reload"] >= 3


def test_retained_bytes_read_while_the_session_runs():
    """Session.retained_bytes from one thread while another runs forwards on the same session, of two
    sizes and with release_memory() between them (scratch and packed weights allocated, replaced and
    freed all the time). It read the scratch dictionary and the snapshot's storage without the session's
    lock and crashed the interpreter (SIGSEGV or SIGILL, in about two of three runs of this scenario);
    the figures are counters now. ConcurrencyTests.testMemoryFiguresMayBeReadWhileTheOwnerChangesThem
    checks the same in Swift, and the counters' values."""
    r = scenario("""
        tiny = DeformUXNet(out_channels=2, feature_size=(4, 4, 4, 4), depths=(1, 1, 1, 1), hidden_size=4)
        s = tiny.session()
        xs = [np.zeros((1, 1, 16, 16, 16), np.float32), np.zeros((1, 1, 16, 32, 16), np.float32)]
        stop = threading.Event()
        forwards, errors = [0], []

        def run():
            try:
                while not stop.is_set():
                    s.forward(xs[forwards[0] % 2])
                    s.release_memory()
                    forwards[0] += 1
            except BaseException as e:
                errors.append(repr(e))

        t = threading.Thread(target=run)
        t.start()
        reads, start, seen = 0, time.perf_counter(), set()
        while time.perf_counter() - start < 1.5:
            seen.add(s.retained_bytes)
            reads += 1
        stop.set()
        t.join()
        s.forward(xs[1])
        print(json.dumps({"forwards": forwards[0], "reads": reads, "distinct": len(seen), "errors": errors,
                          "after": s.retained_bytes}))
    """)
    assert r["errors"] == []
    assert r["forwards"] >= 10 and r["reads"] >= 1000 and r["distinct"] >= 3, r
    assert r["after"] > 0


# ---- item 2: a progress callback that uses its own model ----

def test_progress_callback_reads_its_own_model():
    r = scenario("""
        sd0, config0, summary0 = m.state_dict(), m.config, m.summary(32)
        seen = []

        def progress(step, total):
            sd = m.state_dict()
            assert sd.keys() == sd0.keys() and all(np.array_equal(sd[k], sd0[k]) for k in sd0)
            assert m.config == config0 and m.summary(32) == summary0
            assert m.num_parameters() > 0 and "DeformUXNet" in repr(m)
            m.gradients()  # not held by a forward
            seen.append(step)
            return True

        y = m.forward(x, progress=progress)
        y2 = m.session().forward(x, progress=progress)
        print(json.dumps({"seen": seen, "same": bool(np.array_equal(y, want)), "same2": bool(np.array_equal(y2, want))}))
    """)
    assert r["seen"] == list(range(1, 13)) * 2
    assert r["same"] and r["same2"]


def test_progress_callback_loads_weights_into_its_own_model():
    """A callback that loads new weights into the model it reports on: the running call finishes with
    the weights it started with (its snapshot), and the next call uses the new ones. Checked for
    load_state_dict and load(path), on the default session and on a session of its own, and for a
    backward (its gradients are the old weights' gradients)."""
    r = scenario("""
        old_sd, new_sd = m.state_dict(), other.state_dict()
        new_path = os.path.join(tmp, "other.safetensors")
        other.save(new_path)
        out = {}

        def loading(at, load):
            def progress(step, total):
                if step == at:
                    load()
                return True
            return progress

        for label, at, load in [("load_state_dict", 3, lambda: m.load_state_dict(new_sd)),
                                ("load", 7, lambda: m.load(new_path))]:
            for where, runner in [("default", lambda: m.forward), ("session", lambda: m.session().forward)]:
                run = runner()
                m.load_state_dict(old_sd)
                during = run(x, progress=loading(at, load))
                after = run(x)
                out[f"{label} {where}"] = [bool(np.array_equal(during, want)), bool(np.array_equal(after, want_other))]

        m.load_state_dict(old_sd)
        want_grads = m.backward(x, g)
        want_grads_other = other.backward(x, g)
        during = m.backward(x, g, progress=loading(5, lambda: m.load_state_dict(new_sd)))
        after = m.backward(x, g)
        out["backward"] = [all(np.array_equal(during[k], want_grads[k]) for k in want_grads),
                           all(np.array_equal(after[k], want_grads_other[k]) for k in want_grads)]
        print(json.dumps(out))
    """)
    for case, (during_is_old, after_is_new) in r.items():
        assert during_is_old, f"{case}: the running call did not keep the weights it started with"
        assert after_is_new, f"{case}: the next call did not use the weights loaded during the previous one"


# ---- item 2: re-entrant calls from a callback are refused, never a deadlock ----

def test_reentrant_forward_from_its_callback_is_a_clear_error():
    r = scenario("""
        out = {}

        def calling(at, fn, key):
            def progress(step, total):
                if step == at:
                    try:
                        fn()
                        out[key] = "no error"
                    except Exception as e:
                        out[key] = [type(e).__name__, str(e)]
                return True
            return progress

        y = m.forward(x, progress=calling(2, lambda: m.forward(x), "default"))
        out["outer default"] = bool(np.array_equal(y, want))
        s, s2 = m.session(), m.session()
        y = s.forward(x, progress=calling(2, lambda: s.forward(x), "session"))
        out["outer session"] = bool(np.array_equal(y, want))
        y = s.forward(x, progress=calling(2, lambda: m.release_memory() or s.release_memory(), "release"))
        out["outer release"] = bool(np.array_equal(y, want))
        # another session of the same model works from the callback
        inner = []
        s.forward(x, progress=lambda step, total: step != 4 or inner.append(s2.forward(x)) or True)
        out["other session"] = bool(np.array_equal(inner[0], want))

        # uncaught, the error ends the outer call; the model stays usable
        def reenter(step, total):
            m.forward(x)
            return True
        try:
            m.forward(x, progress=reenter)
            out["uncaught"] = "no error"
        except deformux.DeformUXError as e:
            out["uncaught"] = [type(e).__name__, str(e)]
        out["usable"] = bool(np.array_equal(m.forward(x), want))
        print(json.dumps(out))
    """)
    for key in ("default", "session", "release", "uncaught"):
        assert r[key] != "no error", f"{key}: a re-entrant call from the callback was not refused"
        kind, message = r[key]
        assert kind == "DeformUXError" and "already in use by this thread" in message, (key, message)
    assert r["outer default"] and r["outer session"] and r["outer release"] and r["other session"] and r["usable"]


def test_reentrant_backward_from_its_callback_is_a_clear_error():
    """In a backward's callback: another backward of the same model (any session) and the model's
    gradients are refused; a forward on the same session is refused; a forward on another session and
    reading the weights work."""
    r = scenario("""
        want_grads = m.backward(x, g)
        s2 = m.session()
        out = {}

        def attempt(key, fn):
            try:
                fn()
                out[key] = "no error"
            except Exception as e:
                out[key] = [type(e).__name__, str(e)]

        def progress(step, total):
            if step == 3:
                attempt("backward", lambda: m.backward(x, g))
                attempt("backward other session", lambda: s2.backward(x, g))
                attempt("forward same session", lambda: m.forward(x))
                attempt("gradients", lambda: m.gradients())
                attempt("zero_grad", lambda: m.zero_grad())
                out["forward other session"] = bool(np.array_equal(s2.forward(x), want))
                out["state_dict"] = len(m.state_dict())
            return True

        grads = m.backward(x, g, progress=progress)
        out["outer"] = all(np.array_equal(grads[k], want_grads[k]) for k in want_grads)
        again = m.backward(x, g)
        out["usable"] = all(np.array_equal(again[k], want_grads[k]) for k in want_grads)
        print(json.dumps(out))
    """)
    for key in ("backward", "backward other session"):
        assert r[key][0] == "RuntimeError" and "inside a backward of the same model" in r[key][1], r[key]
    assert r["forward same session"][0] == "DeformUXError" and "session is already in use by this thread" in r["forward same session"][1]
    for key in ("gradients", "zero_grad"):
        assert r[key][0] == "DeformUXError" and "gradients is already in use by this thread" in r[key][1], r[key]
    assert r["forward other session"] and r["state_dict"] > 0 and r["outer"] and r["usable"]


# ---- item 4: report text that changes while it is read ----

def test_report_text_is_always_complete_while_loads_change_it():
    """A loader thread loads files with different subsets of the weights (strict=False), so the
    model's report text switches between four lengths (one under the extension's first 256-byte guess,
    three over it), while this thread reads it as fast as it can. Every text read must be one of the
    four complete reports. Before the fix the extension asked for the size, then filled a buffer of
    that size: when a longer report arrived in between, the engine wrote nothing and the extension
    read the uninitialised buffer as a C string (garbage, a UnicodeDecodeError, or a read past it)."""
    r = scenario("""
        from deformux import convert
        sd = m.state_dict()
        names = list(sd)
        paths = []
        for keep in (names, names[: len(names) // 3], names[: 2 * len(names) // 3], names[:1]):
            path = os.path.join(tmp, f"part{len(keep)}.safetensors")
            convert.write_safetensors(path, {k: sd[k] for k in keep}, {})
            paths.append(path)
        reports = [m.load(p, strict=False) for p in paths]
        assert len({len(t) for t in reports}) == 4, [len(t) for t in reports]
        done = threading.Event()
        loads, errors = [0], []

        def loader():
            try:
                while not done.is_set():
                    for p in paths:
                        m.load(p, strict=False)
                        loads[0] += 1
            except BaseException as e:
                errors.append(repr(e))

        t = threading.Thread(target=loader)
        t.start()
        reads, bad, seen = 0, [], set()
        start = time.perf_counter()
        try:
            while time.perf_counter() - start < 1.0 or loads[0] < 40:
                text = _C.model_last_report(m._handle)
                reads += 1
                if text in reports:
                    seen.add(reports.index(text))
                elif len(bad) < 3:
                    bad.append(text[:300])
        except BaseException as e:
            errors.append(repr(e))
        done.set()
        t.join()
        print(json.dumps({"lengths": sorted(len(t) for t in reports), "reads": reads, "loads": loads[0],
                          "bad": bad, "seen": sorted(seen), "errors": errors}))
    """)
    assert r["errors"] == [] and r["bad"] == [], r
    assert r["lengths"][0] < 256 < r["lengths"][1], r["lengths"]
    assert r["loads"] >= 40 and r["reads"] > r["loads"] and len(r["seen"]) >= 2, r


# ---- fork (should-fix): the child must not deadlock and gets its worker threads back ----

# Forks; the child runs `child()` under an alarm (a deadlocked child is killed, never waited for) and
# sends its JSON result through a pipe. Returns the child's result, or fails the scenario.
FORK = """
from deformux import ops
deformux.set_num_threads(2)
r_op = np.random.default_rng(3)
op_args = (r_op.standard_normal((1, 8, 16, 16, 16)).astype(np.float32),
           r_op.uniform(-2, 2, (1, 81, 16, 16, 16)).astype(np.float32),
           r_op.standard_normal((8, 1, 3, 3, 3)).astype(np.float32))
want_op = ops.deform_conv3d(*op_args)  # the parent's worker threads exist from here on

def task_count():
    return len(os.listdir("/proc/self/task"))

def in_child(child, seconds=30):
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        signal.alarm(seconds)  # a deadlocked child dies of SIGALRM
        try:
            result = child()
        except BaseException as e:
            result = {"error": repr(e)}
        os.write(wr, json.dumps(result).encode())
        os._exit(0)
    os.close(wr)
    data = b""
    while chunk := os.read(rd, 65536):
        data += chunk
    os.close(rd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        raise SystemExit(f"the forked child was killed by {sig}" + (" (it deadlocked)" if sig == "SIGALRM" else ""))
    return json.loads(data)

def child_work():
    deformux.set_num_threads(2)
    before = task_count()
    op = ops.deform_conv3d(*op_args)
    after = task_count()
    return {"threads_before": before, "threads_after": after,
            "op": bool(np.array_equal(op, want_op)),
            "forward default session": bool(np.array_equal(m.forward(x), want)),
            "forward new session": bool(np.array_equal(m.session().forward(x), want)),
            "backward": bool(np.all(np.isfinite(m.backward(x, g)["out.conv.conv.weight"])))}
"""


def check_child(c, label):
    assert "error" not in c, f"{label}: {c['error']}"
    for key in ("op", "forward default session", "forward new session", "backward"):
        assert c[key], f"{label}: {key} in the child gave a wrong result"


def test_fork_child_runs_forward_and_operators_with_its_worker_threads():
    """The parent's worker threads do not survive fork(); the child's first parallel call must start
    new ones (before the fix the pool believed its workers still existed and ran every part on the
    calling thread) and give the same results."""
    c = scenario(FORK, """
        print(json.dumps(in_child(child_work)))
    """)
    check_child(c, "fork")
    assert c["threads_before"] == 1, "the child of fork() starts with one thread"
    assert c["threads_after"] >= 2, "the child's operator call ran without worker threads (none were started)"


def test_fork_while_another_thread_is_inside_a_forward():
    """Another thread of the parent is inside a forward on the model's default session (blocked in its
    progress callback, so it holds the session) when the parent forks; the child uses the same model
    and session. Before the fix the child waited forever for the model's mutex."""
    c = scenario(FORK, """
        inside, release = threading.Event(), threading.Event()

        def progress(step, total):
            if step == 2:
                inside.set()
                release.wait(60)
            return True

        t = threading.Thread(target=lambda: m.forward(x, progress=progress))
        t.start()
        assert inside.wait(30)
        try:
            result = in_child(child_work)
        finally:
            release.set()
            t.join()
        print(json.dumps(result))
    """)
    check_child(c, "fork inside a forward")


def test_fork_while_other_threads_are_computing():
    """Threads of the parent run forwards, a backward and operator calls (holding the session, the
    gradients, the thread pool and the workspace locks, with worker threads mid-job) while the parent
    forks three times; each child computes correctly."""
    c = scenario(FORK, """
        stop = threading.Event()
        errors = []

        def loop(fn):
            def run():
                try:
                    while not stop.is_set():
                        fn()
                except BaseException as e:
                    errors.append(repr(e))
            return run

        x32 = np.zeros((1, 1, 32, 32, 32), np.float32)
        threads = [threading.Thread(target=loop(lambda: m.forward(x32))),
                   threading.Thread(target=loop(lambda: m.backward(x, g))),
                   threading.Thread(target=loop(lambda: ops.deform_conv3d_backward(*op_args, want_op)))]
        for t in threads:
            t.start()
        results = []
        try:
            for delay in (0.05, 0.13, 0.21):
                time.sleep(delay)
                results.append(in_child(child_work))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert errors == [], errors
        print(json.dumps(results))
    """)
    for i, child in enumerate(c):
        check_child(child, f"fork {i}")


def test_multiprocessing_fork_pool_while_a_forward_runs():
    """multiprocessing with the fork start method (how cohort pipelines call us): the pool's worker
    processes are forked while another thread is inside a forward of the model they then use."""
    c = scenario(FORK, """
        import multiprocessing
        inside, release = threading.Event(), threading.Event()

        def progress(step, total):
            if step == 5:
                inside.set()
                release.wait(60)
            return True

        def work(i):
            r = child_work()
            return r

        t = threading.Thread(target=lambda: m.forward(x, progress=progress))
        t.start()
        assert inside.wait(30)
        ctx = multiprocessing.get_context("fork")
        try:
            with ctx.Pool(2) as pool:
                try:
                    results = pool.map_async(work, range(4)).get(timeout=40)
                except multiprocessing.TimeoutError:
                    raise SystemExit("the pool's forked workers did not answer within 40 s (deadlock)")
        finally:
            release.set()
            t.join()
        print(json.dumps(results))
    """)
    for i, child in enumerate(c):
        check_child(child, f"pool task {i}")
        assert child["threads_after"] >= 2


# ---- Ctrl-C (should-fix): honoured inside long operator calls and inside a network step ----

SIGINT = """
from deformux import ops
deformux.set_num_threads(2)
MAIN = threading.main_thread().ident

def interrupted(call, after=None, delay=0.2):
    '''Runs call() on the main thread while a timer thread sends it SIGINT `delay` s after the call
    started (or after `after` is set, when given). The outcome, and the seconds from the signal to the
    KeyboardInterrupt.'''
    sent = []
    def kill():
        if after is not None:
            after.wait(60)
            time.sleep(delay)
        sent.append(time.perf_counter())
        signal.pthread_kill(MAIN, signal.SIGINT)
    timer = threading.Thread(target=kill) if after is not None else threading.Timer(delay, kill)
    timer.start()
    try:
        call()
        outcome = "completed before the signal"
    except KeyboardInterrupt:
        outcome = "interrupted"
    end = time.perf_counter()
    timer.join()
    return {"outcome": outcome, "latency": end - sent[0] if sent else None}

def big_inputs(c, size):
    '''Inputs of an operator call that takes seconds (x is lazily zero-filled memory).'''
    shape = (1, c, size, size, size)
    return {"x": np.zeros(shape, np.float32), "offsets": np.full((1, 81) + shape[2:], 0.25, np.float32),
            "weight": np.ones((c, 1, 3, 3, 3), np.float32), "grad": np.zeros(shape, np.float32),
            "offset_weight": np.zeros((81, c, 1, 1, 1), np.float32), "offset_bias": np.zeros(81, np.float32)}
"""


def check_interrupted(r, label):
    assert r["outcome"] == "interrupted", f"{label}: {r['outcome']}"
    assert r["latency"] < 0.5, f"{label}: KeyboardInterrupt came {r['latency']:.2f} s after SIGINT (limit 0.5 s)"


def test_ctrl_c_interrupts_long_operator_calls():
    """SIGINT to the main thread while it is inside a long ops.deform_conv3d, deform_conv3d_backward or
    ddc_layer_backward call: KeyboardInterrupt within 0.5 s, and the next call on the same thread (same
    workspace) gives the right result. Each operator is first called through the extension with outputs
    of our own, interrupted too: they show that the call stopped its work (before the fix the operators
    polled nothing: the interrupt came once the call had finished, its outputs complete). x is zero and
    the gradient of y is one, so complete outputs are known: y = bias = 1, grad_bias = D * H * W. That
    first call also allocates the thread's scratch (the padded input: page faults nobody can interrupt,
    a few tenths of a second on a busy machine); the timed call after it starts computing at once."""
    r = scenario(SIGINT, """
        r = np.random.default_rng(5)
        small = (r.standard_normal((1, 5, 6, 7, 8)).astype(np.float32),
                 r.uniform(-2, 2, (1, 81, 6, 7, 8)).astype(np.float32),
                 r.standard_normal((5, 1, 3, 3, 3)).astype(np.float32))
        gs = r.standard_normal((1, 5, 6, 7, 8)).astype(np.float32)
        ow, ob = (r.standard_normal((81, 5, 1, 1, 1)) * 0.3).astype(np.float32), r.standard_normal(81).astype(np.float32)
        calls = {
            "forward": (128, 64, lambda a: ops.deform_conv3d(a["x"], a["offsets"], a["weight"]),
                        lambda: [ops.deform_conv3d(*small)]),
            "backward": (96, 56, lambda a: ops.deform_conv3d_backward(a["x"], a["offsets"], a["weight"], a["grad"]),
                         lambda: ops.deform_conv3d_backward(*small, gs)),
            "layer backward": (96, 56, lambda a: ops.ddc_layer_backward(a["x"], a["weight"], a["offset_weight"],
                                                                         a["offset_bias"], a["grad"]),
                               lambda: ops.ddc_layer_backward(small[0], small[2], ow, ob, gs)),
        }
        out = {}
        for label, (c, size, call, again) in calls.items():
            want = again()
            a = big_inputs(c, size)
            # Through the extension, with our outputs: what the interrupted call left in them.
            ws, ones, g1 = ops._workspace(), np.ones(c, np.float32), np.ones_like(a["x"])
            if label == "forward":
                y = np.full_like(a["x"], np.nan)
                raw = interrupted(lambda: _C.deform_conv3d_forward(ws, a["x"], a["offsets"], a["weight"], ones, y), delay=0.05)
                raw["complete"] = bool(np.all(y == 1))
            else:
                gw, gb = np.empty_like(a["weight"]), np.full(c, np.nan, np.float32)
                if label == "backward":
                    fn = lambda: _C.deform_conv3d_backward(ws, a["x"], a["offsets"], a["weight"], g1, None, None, gw, gb)
                else:
                    gow, gob = np.empty_like(a["offset_weight"]), np.empty_like(a["offset_bias"])
                    fn = lambda: _C.ddc_layer_backward(ws, a["x"], a["weight"], a["offset_weight"], a["offset_bias"],
                                                       _C.OFFSET_ALIGNED, g1, None, gw, gb, gow, gob)
                raw = interrupted(fn, delay=0.05)
                raw["complete"] = bool(np.all(gb == size ** 3))
            out[label + " (extension)"] = raw
            del g1
            out[label] = interrupted(lambda: call(a), delay=0.1)
            del a
            deformux.release_memory()
            out[label]["next call right"] = all(np.array_equal(p, q) for p, q in zip(again(), want))
        print(json.dumps(out))
    """)
    for label, v in r.items():
        if "complete" in v:
            assert v["outcome"] == "interrupted", f"{label}: {v['outcome']}"
            assert not v["complete"], f"{label}: the interrupted call finished its work all the same"
        else:
            check_interrupted(v, label)
            assert v["next call right"], f"{label}: the call after the interrupted one gave another result"


def test_ctrl_c_interrupts_one_long_network_step():
    """SIGINT 0.4 s into decoder2, a step that takes 1-2 s at 96^3 with 32 full-resolution channels (the
    next step, decoder1, about as long): KeyboardInterrupt within 0.5 s (before the fix the network
    looked at Ctrl-C only between steps), then the same model (default session) gives the right logits
    again."""
    r = scenario(SIGINT, """
        net = DeformUXNet(out_channels=3, feature_size=(32, 12, 16, 24), hidden_size=32, seed=3)
        want_net = net.forward(x)
        big = np.zeros((1, 1, 96, 96, 96), np.float32)
        decoder2 = threading.Event()
        steps = []

        def progress(step, total):
            steps.append(step)
            if step == 9:  # encoder1 done: decoder2 (at full resolution) is next
                decoder2.set()
            return True

        out = interrupted(lambda: net.forward(big, progress=progress), after=decoder2, delay=0.4)
        out["last step reported"] = steps[-1]
        net.release_memory()
        out["next call right"] = bool(np.array_equal(net.forward(x), want_net))
        print(json.dumps(out))
    """)
    check_interrupted(r, "decoder2 of a network forward")
    assert r["last step reported"] in (9, 10), "the interrupt did not land inside decoder2 or decoder1"
    assert r["next call right"]
