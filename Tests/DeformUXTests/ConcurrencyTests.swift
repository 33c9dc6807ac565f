import Foundation
import Synchronization
import XCTest
@testable import DeformUX

/// Sessions, locks and cancellation at the engine's own level (issue 6: item 2 and the Ctrl-C
/// should-fix). The Python side of the same promises is python/tests/test_concurrency.py.
final class ConcurrencyTests: XCTestCase {
    static let tiny = DeformUXNetConfig(outChannels: 2, featureSize: [2, 2, 2, 2], depths: [1, 0, 0, 0], hiddenSize: 2)

    func input(_ seed: UInt64, _ shape: [Int]) throws -> Tensor {
        var rng = SplitMix64(seed: seed)
        return try Tensor(shape: shape, values: rng.floats(shape.reduce(1, *)))
    }

    /// Runs `body` on a new thread; true if it finished within `seconds` (a thread that waits for a lock
    /// the caller holds does not).
    func finishes(within seconds: Double, _ body: @escaping @Sendable () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        Thread { body(); done.signal() }.start()
        return done.wait(timeout: .now() + seconds) == .success
    }

    // MARK: The session holds no model lock while it calls back

    func testCallbackMayWaitForAnotherThreadWritingTheWeights() throws {
        let net = try DeformUXNet(config: ConcurrencyTests.tiny, seed: 1)
        let other = try DeformUXNet(config: ConcurrencyTests.tiny, seed: 2)
        let x = try input(3, [1, 1, 16, 16, 16])
        let session = try Session(model: net)
        let wantOld = try session.forward(x).toArray(), wantNew = try Session(model: other).forward(x).toArray()
        XCTAssertNotEqual(wantOld, wantNew)
        let count = net.parameters.layout.totalCount
        var wrote = false, read = false
        let y = try session.forward(x, progress: { done, _ in
            if done == 3 {
                // Another thread changes the weights while this forward is between steps, and this
                // callback waits for it: it would wait forever if the forward held the weights' lock.
                wrote = self.finishes(within: 10) {
                    try? net.parameters.write("test") { net.parameters.values.update(from: other.parameters.values, count: count) }
                }
                read = self.finishes(within: 10) { _ = try? net.parameters.read("test") { _ in 0 } }
            }
            return true
        }).toArray()
        XCTAssertTrue(wrote, "a thread writing the weights waited for a running forward's callback")
        XCTAssertTrue(read, "a thread reading the weights waited for a running forward's callback")
        XCTAssertEqual(y, wantOld, "the running forward keeps the weights it started with")
        XCTAssertEqual(try session.forward(x).toArray(), wantNew, "the next forward uses the new weights")
    }

    // MARK: fork() waits until no thread runs engine code

    /// The fork handler's first step (`ActivityGate.quiesce`) returns only once no other thread is inside
    /// the engine, keeps new ones out until `resume`, and does not wait for threads that are outside
    /// (in a callback) or waiting for a long lock. Before the gate, a pool worker still starting up (or a
    /// thread instantiating a generic type's metadata for the first time) when the parent forked left the
    /// Swift runtime's one-time work marked in progress in the child, which then hung (CI, fork tests).
    func testForkWaitsUntilNoThreadRunsEngineCode() throws {
        let gate = EngineActivity.gate
        let left = Atomic<Bool>(false), reentered = Atomic<Bool>(false)
        let inside = DispatchSemaphore(value: 0)
        Thread {
            EngineActivity.inside {
                inside.signal()
                usleep(300_000)
                left.store(true, ordering: .sequentiallyConsistent)
            }
        }.start()
        inside.wait()
        gate.quiesce()
        XCTAssertTrue(left.load(ordering: .sequentiallyConsistent), "quiesce returned while a thread was inside the engine")
        // While the door is closed a new call waits; it runs once the door opens again.
        let waiter = DispatchSemaphore(value: 0)
        Thread {
            EngineActivity.inside { reentered.store(true, ordering: .sequentiallyConsistent) }
            waiter.signal()
        }.start()
        usleep(200_000)
        XCTAssertFalse(reentered.load(ordering: .sequentiallyConsistent), "a call entered the engine during a fork")
        gate.resume()
        XCTAssertEqual(waiter.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(reentered.load(ordering: .sequentiallyConsistent))

        // A thread in a callback (outside) or waiting for a long lock does not hold a fork up.
        let lock = OwnedLock("test object")
        let holding = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        Thread {
            EngineActivity.inside {
                try? lock.withLock("hold") {
                    EngineActivity.outside {  // as a progress callback waiting for the GIL would
                        holding.signal()
                        release.wait()
                    }
                }
            }
        }.start()
        holding.wait()
        let blocked = DispatchSemaphore(value: 0)
        Thread { EngineActivity.inside { try? lock.withLock("wait") {} }; blocked.signal() }.start()
        usleep(100_000)
        XCTAssertTrue(finishes(within: 10) { gate.quiesce() }, "a fork waited for a callback or a lock waiter")
        gate.resume()
        release.signal()
        XCTAssertEqual(blocked.wait(timeout: .now() + 10), .success)

        // A pool worker counts until it sleeps: after a parallel call returns, quiesce waits for the
        // workers that are still finishing.
        let threads = Threads.count
        defer { try? Threads.setCount(threads) }
        try Threads.setCount(2)
        let ran = Atomic<Int>(0)
        EngineActivity.inside { parallelFor(8) { _ in usleep(2_000); ran.add(1, ordering: .relaxed) } }
        gate.quiesce()
        XCTAssertEqual(ran.load(ordering: .relaxed), 8)
        gate.resume()
    }

    func testReentrantCallsFromACallbackAreBusyErrors() throws {
        let net = try DeformUXNet(config: ConcurrencyTests.tiny, seed: 1)
        let x = try input(3, [1, 1, 16, 16, 16])
        let gy = try input(4, [1, 2, 16, 16, 16])
        let session = try Session(model: net), second = try Session(model: net)
        let want = try session.forward(x).toArray()
        var kinds: [String: DeformUXError.Kind] = [:]
        var secondOK = false
        func attempt(_ label: String, _ body: () throws -> Void) {
            do { try body(); kinds[label] = nil } catch let e as DeformUXError { kinds[label] = e.kind } catch {}
        }
        let y = try session.forward(x, progress: { done, _ in
            if done == 2 {
                attempt("forward") { _ = try session.forward(x) }
                attempt("release") { try session.releaseMemory() }
                secondOK = (try? second.forward(x).toArray()) == want
            }
            return true
        }).toArray()
        XCTAssertEqual(kinds["forward"], .busy)
        XCTAssertEqual(kinds["release"], .busy)
        XCTAssertTrue(secondOK, "another session of the model works from the callback")
        XCTAssertEqual(y, want)
        try net.parameters.withGradients("test") { net.parameters.zeroGradients() }
        try session.backward(x, gradOutput: gy, progress: { done, _ in
            if done == 3 {
                attempt("gradients") { try net.parameters.withGradients("test") {} }
                attempt("backward") { try second.backward(x, gradOutput: gy) }
                attempt("values") { try net.parameters.read("test") { _ in } }
            }
            return true
        })
        XCTAssertEqual(kinds["gradients"], .busy)
        XCTAssertEqual(kinds["backward"], .busy)
        XCTAssertNil(kinds["values"], "reading the weights from a backward's callback works")
    }

    func testLocksRefuseReentryAndAllowNestedReads() throws {
        let owned = OwnedLock("thing")
        XCTAssertThrowsError(try owned.withLock("outer") { try owned.withLock("inner") {} }) { e in
            XCTAssertEqual((e as? DeformUXError)?.kind, .busy)
            XCTAssertTrue("\(e)".contains("the thing is already in use by this thread"), "\(e)")
        }
        let rw = ReadWriteLock("weights")
        XCTAssertThrowsError(try rw.write("outer") { try rw.write("inner") {} }) { XCTAssertEqual(($0 as? DeformUXError)?.kind, .busy) }
        XCTAssertThrowsError(try rw.write("outer") { try rw.read("inner") {} }) { XCTAssertEqual(($0 as? DeformUXError)?.kind, .busy) }
        XCTAssertNoThrow(try rw.read("outer") { try rw.read("inner") {} })
        // After each refusal the locks are free again.
        XCTAssertNoThrow(try owned.withLock("again") {})
        XCTAssertTrue(finishes(within: 10) { _ = try? rw.write("other thread") {} })
    }

    // MARK: Memory figures read while the owner changes them

    func testMemoryFiguresMayBeReadWhileTheOwnerChangesThem() throws {
        // A session's retainedBytes (Python: Session.retained_bytes) is read from any thread, also
        // while the session runs a call that grows, replaces and frees its scratch and packed weights.
        // It read the workspace's dictionary and the snapshot's storage reference unsynchronised: the
        // interpreter crashed (SIGSEGV, SIGILL). Now both keep a counter.
        let net = try DeformUXNet(config: ConcurrencyTests.tiny, seed: 1)
        let ws = Workspace()
        let snapshot = try WeightSnapshot(layout: net.parameters.layout, forms: net.forms)
        let stop = Atomic<Bool>(false)
        let reads = Atomic<Int>(0)
        let reader = Thread {
            while !stop.load(ordering: .relaxed) {
                _ = ws.bytes + snapshot.bytes
                reads.add(1, ordering: .relaxed)
            }
        }
        reader.start()
        var expected: [String: Int] = [:]  // the owner's view: what buffer() keeps per name
        for i in 0..<50_000 {
            let name = "b\(i % 7)", count = 16 + (i * 37) % 4096
            _ = try ws.buffer(name, count: count)
            expected[name] = max(expected[name] ?? 0, count)
            switch i % 97 {
            case 0:
                ws.release()
                expected.removeAll()
            case 50:
                ws.release(prefixes: ["b1", "b2"])
                expected["b1"] = nil
                expected["b2"] = nil
            default: break
            }
            if i % 13 == 0 {
                snapshot.release()
                try snapshot.refresh(from: net.parameters, operation: "test")
            }
            XCTAssertEqual(ws.bytes, 4 * expected.values.reduce(0, +), "after step \(i)")
            if ws.bytes != 4 * expected.values.reduce(0, +) { break }
        }
        stop.store(true, ordering: .relaxed)
        while reads.load(ordering: .relaxed) == 0 { usleep(1000) }
        XCTAssertEqual(snapshot.bytes, 4 * snapshot.total)
        snapshot.release()
        XCTAssertEqual(snapshot.bytes, 0)
    }

    // MARK: Cancellation inside kernels

    func testCancellationPollsPromptlyWhenBlocksAreSlow() {
        // Blocks of 20 ms (a plane of a large convolution): the poll must come after about `interval`
        // (0.1 s), not after 16 blocks (0.32 s), as when the clock was read only every 16th call.
        var polls = 0
        let c = Cancellation(poll: { polls += 1; return false })
        var calls = 0
        while !c.stopRequested() && calls < 100 {
            usleep(20_000)
            calls += 1
        }
        XCTAssertTrue(c.isCancelled)
        XCTAssertEqual(polls, 1)
        XCTAssertLessThan(calls, 12, "the poll came after \(calls) blocks of 20 ms")
        // Fast blocks still reach the poll, after about the interval.
        let start = Cancellation.now()
        let fast = Cancellation(poll: { false })
        var n = 0
        while !fast.stopRequested() { n += 1 }
        XCTAssertLessThan(Cancellation.now() - start, 1.0, "\(n) fast calls")
    }

    func testACancelledKernelStopsEarlyAndSaysSo() throws {
        let shape = try DDCShape(n: 1, c: 8, d: 16, h: 16, w: 16)
        let x = try input(1, [1, 8, 16, 16, 16])
        let offsets = try Tensor(zeros: [1, 81, 16, 16, 16])
        let weight = try input(2, [8, 1, 3, 3, 3])
        let y = try Tensor(uninitialized: [1, 8, 16, 16, 16])
        y.pointer.initialize(repeating: .nan, count: y.count)
        let ws = Workspace()
        // Cancels at the first poll (interval 0): the kernel returns after at most a block per part.
        ws.cancellation = Cancellation(interval: 0, poll: { false })
        do {
            try DeformConv3d.forward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, bias: nil, y: y.pointer,
                                     shape: shape, workspace: ws)
            XCTFail("a cancelled forward returned normally")
        } catch let e as DeformUXError {
            XCTAssertEqual(e.kind, .cancelled)
        }
        let untouched = try y.toArray().filter(\.isNaN).count
        XCTAssertGreaterThan(untouched, y.count / 2, "the cancelled kernel computed most of its output anyway")
        // The same workspace, not cancelled, computes the whole output.
        ws.cancellation = nil
        try DeformConv3d.forward(x: x.pointer, offsets: offsets.pointer, weight: weight.pointer, bias: nil, y: y.pointer,
                                 shape: shape, workspace: ws)
        XCTAssertFalse(try y.toArray().contains(where: \.isNaN))
    }
}
