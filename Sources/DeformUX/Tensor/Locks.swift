#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The engine's locks, safe across `fork()` (cohort pipelines fork worker processes with
/// `multiprocessing`, possibly while another thread is inside the engine).
///
/// Two kinds, both registered with one `pthread_atfork` handler set:
/// - `ShortLock`: guards a few instructions of bookkeeping (the thread pool's queue, a storage pool's
///   lists). The fork handler takes every short lock before the fork and releases it in both processes,
///   so the child inherits consistent data and unlocked locks.
/// - `OwnedLock` and `ReadWriteLock`: held for a whole call (a session running a forward, a model's
///   weights being loaded). Waiting for them before a fork could wait for seconds, or forever if their
///   holder waits for the forking thread (a Python callback waiting for the GIL). In the child they are
///   re-created unlocked instead, and `Fork.generation` is bumped so that their owners can drop state
///   a thread of the parent was halfway through changing.
public enum Fork {
    /// Incremented in a child process after every fork: state that a lock protected may be stale.
    public static var generation: UInt64 { registry.generation }
}

/// The threads running engine code, counted so that `fork()` can wait until none is: a thread copied
/// halfway through the Swift runtime's lazy work (the first use of a generic type's metadata, a global's
/// one-time initialiser) leaves that work marked as in progress in the child, whose first use of it
/// then waits forever (seen in CI: a pool worker still starting up when the parent forked).
///
/// Counted: calls through the C ABI (`EngineActivity.inside`, from `guarded`) and the pool's workers
/// from their creation until they sleep. Not counted: a thread inside a caller's callback (which may
/// wait for the GIL that the forking thread holds) or waiting for a long lock (whose holder may be in
/// such a callback): `EngineActivity.outside`. The fork handler waits until no thread is counted and
/// new ones wait at the door until the fork is over, so every thread is in Python, asleep, or in a lock
/// wait when the process is copied.
public enum EngineActivity {
    static let gate = ActivityGate()
    /// This thread's nesting of `inside` (0: not counted).
    private static let depth = ThreadLocalCount()

    /// Runs `body` counted as engine work (nests; waits first while another thread forks).
    @inline(__always)
    public static func inside<T>(_ body: () throws -> T) rethrows -> T {
        let d = depth.value
        if d == 0 { gate.enter() }
        depth.value = d + 1
        defer {
            depth.value = d
            if d == 0 { gate.leave() }
        }
        return try body()
    }

    /// Runs `body` not counted (a caller's callback, a wait for a long lock); back inside afterwards.
    @inline(__always)
    public static func outside<T>(_ body: () throws -> T) rethrows -> T {
        let d = depth.value
        if d == 0 { return try body() }
        depth.value = 0
        gate.leave()
        defer {
            gate.enter()
            depth.value = d
        }
        return try body()
    }

    /// Whether the calling thread is counted.
    static var isInside: Bool { depth.value > 0 }
}

/// The count behind `EngineActivity`, with its own mutex (never held while taking another lock).
final class ActivityGate: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var changed = pthread_cond_t()
    private var running = 0
    private var forking = false

    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&changed, nil)
    }

    func enter() {
        pthread_mutex_lock(&mutex)
        while forking { pthread_cond_wait(&changed, &mutex) }
        running += 1
        pthread_mutex_unlock(&mutex)
    }

    /// `enter` unless a fork is under way (for a pool worker, which holds the pool's lock and must not
    /// wait: it skips the job instead).
    func tryEnter() -> Bool {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        if forking { return false }
        running += 1
        return true
    }

    /// Counts a thread about to be created by a counted thread (so no fork can start before it runs).
    func adopt() {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        running += 1
    }

    func leave() {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        running -= 1
        if forking { pthread_cond_broadcast(&changed) }
    }

    /// Before fork: closes the door and waits until no other thread is counted.
    func quiesce() {
        let own = EngineActivity.isInside ? 1 : 0
        pthread_mutex_lock(&mutex)
        while forking { pthread_cond_wait(&changed, &mutex) }  // another thread's fork
        forking = true
        while running > own { pthread_cond_wait(&changed, &mutex) }
        pthread_mutex_unlock(&mutex)
    }

    /// After fork, in the parent: opens the door.
    func resume() {
        pthread_mutex_lock(&mutex)
        forking = false
        pthread_cond_broadcast(&changed)
        pthread_mutex_unlock(&mutex)
    }

    /// After fork, in the child: only the forking thread exists.
    func reinitialiseAfterFork() {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&changed, nil)
        running = EngineActivity.isInside ? 1 : 0
        forking = false
    }
}

/// A per-thread count (pthread TLS, no Foundation).
final class ThreadLocalCount: @unchecked Sendable {
    private var key = pthread_key_t()
    init() { pthread_key_create(&key, nil) }
    var value: Int {
        get { Int(bitPattern: pthread_getspecific(key)) }
        set { pthread_setspecific(key, UnsafeRawPointer(bitPattern: newValue)) }
    }
}

/// Registry of live locks, consulted by the fork handlers.
final class LockRegistry: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var short: [ObjectIdentifier: Unmanaged<ShortLock>] = [:]
    private var long: [ObjectIdentifier: LongLock] = [:]
    fileprivate(set) var generation: UInt64 = 0

    init() {
        pthread_mutex_init(&mutex, nil)
        pthread_atfork({ registry.prepare() }, { registry.parent() }, { registry.child() })
    }

    func add(_ l: ShortLock) {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        short[ObjectIdentifier(l)] = Unmanaged.passUnretained(l)
    }

    func add(_ l: LongLock) {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        long[ObjectIdentifier(l as AnyObject)] = l
    }

    func remove(_ id: ObjectIdentifier) {
        pthread_mutex_lock(&mutex); defer { pthread_mutex_unlock(&mutex) }
        short[id] = nil
        long[id] = nil
    }

    // Before fork: hold the registry and every short lock (in a fixed order), so no other thread is
    // inside one of them when the process is copied.
    private var held: [Unmanaged<ShortLock>] = []
    func prepare() {
        EngineActivity.gate.quiesce()  // first: a counted thread may still need the registry or a short lock
        pthread_mutex_lock(&mutex)
        held = short.sorted { $0.key < $1.key }.map(\.value)
        for l in held { l.takeUnretainedValue().rawLock() }
    }

    func parent() {
        for l in held.reversed() { l.takeUnretainedValue().rawUnlock() }
        held = []
        pthread_mutex_unlock(&mutex)
        EngineActivity.gate.resume()
    }

    func child() {
        for l in held.reversed() { l.takeUnretainedValue().rawUnlock() }
        held = []
        for l in long.values { l.reinitialiseAfterFork() }
        generation &+= 1
        Threads.pool.reinitialiseAfterFork()
        EngineActivity.gate.reinitialiseAfterFork()
        pthread_mutex_unlock(&mutex)
    }
}

let registry = LockRegistry()

/// A lock for short critical sections; see `Fork`.
public final class ShortLock: @unchecked Sendable {
    private var mutex = pthread_mutex_t()

    public init() {
        pthread_mutex_init(&mutex, nil)
        registry.add(self)
    }

    deinit {
        registry.remove(ObjectIdentifier(self))
        pthread_mutex_destroy(&mutex)
    }

    fileprivate func rawLock() { pthread_mutex_lock(&mutex) }
    fileprivate func rawUnlock() { pthread_mutex_unlock(&mutex) }

    @inline(__always) public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }

    /// Waits on `cond` (which must only be used with this lock).
    func wait(_ cond: UnsafeMutablePointer<pthread_cond_t>) { pthread_cond_wait(cond, &mutex) }
    func lock() { pthread_mutex_lock(&mutex) }
    func unlock() { pthread_mutex_unlock(&mutex) }
}

protocol LongLock: AnyObject {
    func reinitialiseAfterFork()
}

/// The calling thread's identity, for locks that detect re-entrant use.
@inline(__always) func currentThread() -> pthread_t { pthread_self() }

/// A lock held for whole calls, which knows its owner: a thread that already holds it (a progress
/// callback calling back into the object it reports on) gets a `.busy` error instead of a deadlock.
public final class OwnedLock: LongLock, @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    /// The holder (guarded by `mutex` being held by it; read racily only to detect re-entry by the
    /// calling thread itself, which is exact: only the owner can see its own id there).
    private var owner: pthread_t?
    private let what: String

    /// `what` names the object in errors ("session", "model gradients").
    public init(_ what: String) {
        self.what = what
        pthread_mutex_init(&mutex, nil)
        registry.add(self)
    }

    deinit {
        registry.remove(ObjectIdentifier(self))
        pthread_mutex_destroy(&mutex)
    }

    func reinitialiseAfterFork() {
        pthread_mutex_init(&mutex, nil)
        owner = nil
    }

    /// Runs `body` holding the lock, waiting for other threads; throws `.busy` if this thread holds it.
    public func withLock<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        if let o = owner, pthread_equal(o, currentThread()) != 0 {
            throw DeformUXError.busy(operation, "the \(what) is already in use by this thread (called from its own progress callback?)")
        }
        if pthread_mutex_trylock(&mutex) != 0 {
            EngineActivity.outside { _ = pthread_mutex_lock(&mutex) }
        }
        owner = currentThread()
        defer {
            owner = nil
            pthread_mutex_unlock(&mutex)
        }
        return try body()
    }
}

/// Many readers or one writer, held for whole calls (a model's weights: read while a session takes a
/// snapshot of them, written by a load or an optimiser step). Re-entrant use by a writer throws `.busy`.
public final class ReadWriteLock: LongLock, @unchecked Sendable {
    private var rw = pthread_rwlock_t()
    private var writer: pthread_t?
    private let what: String

    public init(_ what: String) {
        self.what = what
        pthread_rwlock_init(&rw, nil)
        registry.add(self)
    }

    deinit {
        registry.remove(ObjectIdentifier(self))
        pthread_rwlock_destroy(&rw)
    }

    func reinitialiseAfterFork() {
        pthread_rwlock_init(&rw, nil)
        writer = nil
    }

    private func checkNotWriter(_ operation: String) throws {
        if let w = writer, pthread_equal(w, currentThread()) != 0 {
            throw DeformUXError.busy(operation, "the \(what) is being changed by this thread")
        }
    }

    public func read<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        try checkNotWriter(operation)
        if pthread_rwlock_tryrdlock(&rw) != 0 {
            EngineActivity.outside { _ = pthread_rwlock_rdlock(&rw) }
        }
        defer { pthread_rwlock_unlock(&rw) }
        return try body()
    }

    public func write<T>(_ operation: String, _ body: () throws -> T) throws -> T {
        try checkNotWriter(operation)
        if pthread_rwlock_trywrlock(&rw) != 0 {
            EngineActivity.outside { _ = pthread_rwlock_wrlock(&rw) }
        }
        writer = currentThread()
        defer {
            writer = nil
            pthread_rwlock_unlock(&rw)
        }
        return try body()
    }
}
