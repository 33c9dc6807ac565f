#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import COpenBLAS

/// The engine's worker threads.
///
/// Kernels split their work into `Threads.count` parts by index (a static partition, see
/// `Threads.range`) and run them with `parallelFor`. Which thread runs a part never changes what
/// the part computes, so results depend on the thread count but never on timing.
///
/// OpenBLAS is kept single-threaded: the engine calls sgemm from inside its own parts, and two
/// thread pools on 2 cores only fight (PERFORMANCE.md).
public enum Threads {
    /// The number of parts kernels split their work into (default: online CPUs).
    public static var count: Int {
        get { pool.lock(); defer { pool.unlock() }; return pool.threadCount }
    }

    /// Sets the number of worker threads (>= 1).
    public static func setCount(_ n: Int) throws {
        guard n >= 1, n <= 1024 else {
            throw DeformUXError.invalidArgument("set_num_threads", "expected 1...1024 threads, got \(n)")
        }
        pool.lock(); defer { pool.unlock() }
        pool.threadCount = n
    }

    /// The sub-range of `0..<total` that part `part` of `parts` owns: contiguous, in order, sizes
    /// differing by at most one.
    @inlinable
    public static func range(_ part: Int, of parts: Int, total: Int) -> Range<Int> {
        let lo = total * part / parts
        let hi = total * (part + 1) / parts
        return lo..<hi
    }

    static let pool = ThreadPool(threadCount: defaultThreadCount())

    private static func defaultThreadCount() -> Int {
        openblas_set_num_threads(1)
        let n = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        return max(1, min(n, 256))
    }
}

/// Runs `body(part)` for every part in `0..<parts`, on up to `Threads.count` threads, and returns
/// when all are done. Parts should be coarse (milliseconds each). Called from inside a part, or
/// while another caller is using the pool, the parts run one after another on the calling thread:
/// the same parts, so the same results.
public func parallelFor(_ parts: Int, _ body: (Int) -> Void) {
    if parts <= 0 { return }
    if parts == 1 { body(0); return }
    Threads.pool.run(parts: parts, body)
}

/// A small persistent pool of pthreads. The calling thread works too.
///
/// After `fork()` the child has no workers (threads are not copied): `reinitialiseAfterFork` (called by
/// the fork handler, see Locks.swift) resets the pool to empty, and the next job spawns workers again.
final class ThreadPool: @unchecked Sendable {
    private let mutex = ShortLock()
    private let wake: UnsafeMutablePointer<pthread_cond_t>
    private let done: UnsafeMutablePointer<pthread_cond_t>
    /// Held by the caller whose job the pool is running (for the whole job).
    private let busy: UnsafeMutablePointer<pthread_mutex_t>

    var threadCount: Int  // guarded by mutex
    private var workers = 0
    /// Workers with an index below this take parts of the current job (the others sleep through it,
    /// so lowering the thread count lowers the concurrency).
    private var activeHelpers = 0
    private var generation = 0
    private var job: ((Int) -> Void)?
    private var nextPart = 0
    private var totalParts = 0
    private var unfinished = 0

    init(threadCount: Int) {
        self.threadCount = threadCount
        wake = .allocate(capacity: 1)
        done = .allocate(capacity: 1)
        busy = .allocate(capacity: 1)
        pthread_mutex_init(busy, nil)
        pthread_cond_init(wake, nil)
        pthread_cond_init(done, nil)
    }

    func lock() { mutex.lock() }
    func unlock() { mutex.unlock() }

    /// In a forked child: no worker exists, no job runs, and no caller holds the pool.
    func reinitialiseAfterFork() {
        pthread_mutex_init(busy, nil)
        pthread_cond_init(wake, nil)
        pthread_cond_init(done, nil)
        workers = 0
        activeHelpers = 0
        job = nil
        nextPart = 0
        totalParts = 0
        unfinished = 0
    }

    /// Non-zero on a thread running a part (its nested parallel calls run serially).
    private static let insidePart = ThreadLocalCount()

    func run(parts: Int, _ body: (Int) -> Void) {
        // Nested calls, and callers that find the pool taken, run serially: same parts, same results.
        if ThreadPool.insidePart.value != 0 || pthread_mutex_trylock(busy) != 0 {
            for p in 0..<parts { body(p) }
            return
        }
        defer { pthread_mutex_unlock(busy) }
        lock()
        let helpers = min(threadCount, parts) - 1
        if helpers <= 0 {
            unlock()
            for p in 0..<parts { body(p) }
            return
        }
        while workers < helpers {
            // A worker that cannot be created leaves its parts to the caller and the others.
            if !spawnWorker() { break }
        }
        activeHelpers = min(helpers, workers)
        withoutActuallyEscaping(body) { escapable in
            job = escapable
            nextPart = 0
            totalParts = parts
            unfinished = parts
            generation &+= 1
            pthread_cond_broadcast(wake)
            unlock()
            drain()
            lock()
            while unfinished > 0 { mutex.wait(done) }
            job = nil
            unlock()
        }
    }

    /// Takes parts until none are left. Called with the mutex not held.
    private func drain() {
        ThreadPool.insidePart.value = 1
        defer { ThreadPool.insidePart.value = 0 }
        while true {
            lock()
            guard nextPart < totalParts, job != nil else { unlock(); return }
            let part = nextPart
            nextPart += 1
            var body = job
            unlock()
            body?(part)
            // Drop this copy of the closure before the part counts as finished: the caller then leaves
            // withoutActuallyEscaping, which checks that nobody still holds it.
            body = nil
            lock()
            unfinished -= 1
            if unfinished == 0 { pthread_cond_broadcast(done) }
            unlock()
        }
    }

    /// A worker counts as engine activity (see `EngineActivity`) from its creation until it sleeps, and
    /// again from a wake-up with work until it sleeps again; woken while a fork is under way, it sleeps
    /// through the job, which the others finish.
    private func workerLoop(index: Int, startGeneration: Int) {
        var seen = startGeneration
        var counted = true  // adopted by spawnWorker
        lock()
        while true {
            if generation == seen {
                if counted {
                    EngineActivity.gate.leave()
                    counted = false
                }
                while generation == seen { mutex.wait(wake) }
            }
            seen = generation
            if index >= activeHelpers { continue }
            if !counted {
                guard EngineActivity.gate.tryEnter() else { continue }
                counted = true
            }
            unlock()
            drain()
            lock()
        }
    }

    /// Starts one more worker (called with the mutex held); false if the system refused a thread.
    private func spawnWorker() -> Bool {
        let index = workers
        // The worker starts from the generation current now, so it also takes the job about to start.
        let box = Unmanaged.passRetained(WorkerStart(pool: self, index: index, generation: generation)).toOpaque()
        var thread = pthread_t()
        EngineActivity.gate.adopt()
        let rc = pthread_create(&thread, nil, { arg in
            guard let arg else { return nil }
            let start = Unmanaged<WorkerStart>.fromOpaque(arg).takeRetainedValue()
            start.pool.workerLoop(index: start.index, startGeneration: start.generation)
            return nil
        }, box)
        guard rc == 0 else {
            EngineActivity.gate.leave()
            Unmanaged<WorkerStart>.fromOpaque(box).release()
            return false
        }
        pthread_detach(thread)
        workers += 1
        return true
    }
}

private final class WorkerStart {
    let pool: ThreadPool
    let index: Int
    let generation: Int
    init(pool: ThreadPool, index: Int, generation: Int) { self.pool = pool; self.index = index; self.generation = generation }
}
