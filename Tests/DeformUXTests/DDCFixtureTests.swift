import Foundation
import XCTest
@testable import DeformUX

/// One case of Tests/Fixtures/ddc (written by tools/make_ddc_fixtures.py from PyTorch's grid_sample
/// and autograd in float64): named float32 arrays.
struct DDCFixture {
    let name: String
    let kind: String
    let shape: DDCShape
    let mode: String
    let arrays: [String: [Float]]

    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/ddc")

    static func loadAll() throws -> [DDCFixture] {
        let manifest = try String(contentsOf: directory.appendingPathComponent("manifest.txt"), encoding: .utf8)
        var out: [DDCFixture] = []
        for line in manifest.split(separator: "\n") where !line.hasPrefix("#") {
            let f = line.split(separator: " ").map(String.init)
            guard f.count > 8, let n = Int(f[2]), let c = Int(f[3]), let d = Int(f[4]), let h = Int(f[5]), let w = Int(f[6]) else {
                throw DeformUXError.io("fixture manifest", "bad line '\(line)'")
            }
            let data = try Data(contentsOf: directory.appendingPathComponent(f[0] + ".bin"))
            var arrays: [String: [Float]] = [:]
            var at = 0
            for field in f[8...] {
                let kv = field.split(separator: ":")
                guard kv.count == 2, let count = Int(kv[1]), at + count * 4 <= data.count else {
                    throw DeformUXError.io("fixture \(f[0])", "bad array '\(field)' or file too short")
                }
                arrays[String(kv[0])] = data.withUnsafeBytes { raw in
                    (0..<count).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: at + 4 * $0, as: UInt32.self))) }
                }
                at += count * 4
            }
            guard at == data.count else { throw DeformUXError.io("fixture \(f[0])", "\(data.count - at) trailing bytes") }
            out.append(DDCFixture(name: f[0], kind: f[1], shape: try DDCShape(n: n, c: c, d: d, h: h, w: w), mode: f[7], arrays: arrays))
        }
        return out
    }

    subscript(_ key: String) -> [Float] {
        guard let a = arrays[key] else { fatalError("fixture \(name) has no array \(key)") }
        return a
    }

    func double(_ key: String) -> [Double] { self[key].map(Double.init) }
}

/// The DDC kernel and layer against PyTorch (grid_sample, autograd). The fixtures hold float64 results
/// rounded to float32.
final class DDCFixtureTests: XCTestCase {
    let threads = ThreadCountGuard()
    override func tearDown() { threads.restore() }

    func fixtures(_ kind: String) throws -> [DDCFixture] {
        let all = try DDCFixture.loadAll().filter { $0.kind == kind }
        XCTAssertFalse(all.isEmpty, "no \(kind) fixtures in \(DDCFixture.directory.path)")
        return all
    }

    func testKernelMatchesTorch() throws {
        // The Double oracle differs from torch by the float32 rounding of the stored results; the fast
        // kernel by Float arithmetic as in DeformConv3dTests.
        let refTol = (atol: 1e-6, rtol: 1e-6)
        let fastTol = (atol: 1e-5, rtol: 1e-5), fastParamTol = (atol: 1e-4, rtol: 1e-5)
        for f in try fixtures("kernel") {
            let s = f.shape
            let xs = [s.n, s.c, s.d, s.h, s.w], os = [s.n, 81, s.d, s.h, s.w]
            let label = "fixture '\(f.name)' [\(s)]"
            let y = DeformConv3dReference.forward(x: f.double("x"), offsets: f.double("offsets"),
                                                  weight: f.double("weight"), bias: f.double("bias"), shape: s)
            let g = DeformConv3dReference.backward(x: f.double("x"), offsets: f.double("offsets"),
                                                   weight: f.double("weight"), gradY: f.double("grad_y"), shape: s)
            assertClose(y, f.double("y"), atol: refTol.atol, rtol: refTol.rtol, shape: xs, "\(label): reference y vs torch")
            assertClose(g.gradX, f.double("grad_x"), atol: refTol.atol, rtol: refTol.rtol, shape: xs, "\(label): reference grad x vs torch")
            assertClose(g.gradOffsets, f.double("grad_offsets"), atol: refTol.atol, rtol: refTol.rtol, shape: os, "\(label): reference grad offsets vs torch")
            assertClose(g.gradWeight, f.double("grad_weight"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad weight vs torch")
            assertClose(g.gradBias, f.double("grad_bias"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad bias vs torch")

            for t in [1, 2] {
                try Threads.setCount(t)
                let l = "\(label), \(t) thread(s)"
                let x = try Tensor(shape: xs, values: f["x"]), off = try Tensor(shape: os, values: f["offsets"])
                let w = try Tensor(shape: [s.c, 1, 3, 3, 3], values: f["weight"])
                let yf = try DeformConv3d.forward(x: x, offsets: off, weight: w, bias: Tensor(shape: [s.c], values: f["bias"])).toArray()
                let gf = try DeformConv3d.backward(x: x, offsets: off, weight: w, gradY: Tensor(shape: xs, values: f["grad_y"]))
                assertClose(yf, f.double("y"), atol: fastTol.atol, rtol: fastTol.rtol, shape: xs, "\(l): fast y vs torch")
                assertClose(try gf.gradX.toArray(), f.double("grad_x"), atol: fastTol.atol, rtol: fastTol.rtol, shape: xs, "\(l): fast grad x vs torch")
                assertClose(try gf.gradOffsets.toArray(), f.double("grad_offsets"), atol: fastTol.atol, rtol: fastTol.rtol, shape: os, "\(l): fast grad offsets vs torch")
                assertClose(try gf.gradWeight.toArray(), f.double("grad_weight"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad weight vs torch")
                assertClose(try gf.gradBias.toArray(), f.double("grad_bias"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad bias vs torch")
            }
        }
    }

    func testLayerMatchesTorch() throws {
        let refTol = (atol: 1e-6, rtol: 1e-6)
        // Float offsets come from sgemm; grad offset weight sums grad_offsets * x over voxels.
        let fastTol = (atol: 2e-5, rtol: 1e-5), fastParamTol = (atol: 2e-4, rtol: 1e-5)
        for f in try fixtures("layer") {
            guard let mode = OffsetMode(rawValue: f.mode) else {
                XCTFail("fixture \(f.name): unknown offset mode \(f.mode)"); continue
            }
            let s = f.shape
            let xs = [s.n, s.c, s.d, s.h, s.w], os = [s.n, 81, s.d, s.h, s.w]
            let label = "fixture '\(f.name)' [\(s), \(mode)]"
            let r = DDCLayerReference.forward(x: f.double("x"), weight: f.double("weight"), bias: f.double("bias"),
                                              offsetWeight: f.double("offset_weight"), offsetBias: f.double("offset_bias"),
                                              mode: mode, shape: s)
            let rg = DDCLayerReference.backward(x: f.double("x"), weight: f.double("weight"),
                                                offsetWeight: f.double("offset_weight"), offsetBias: f.double("offset_bias"),
                                                mode: mode, gradY: f.double("grad_y"), shape: s)
            assertClose(r.offsets, f.double("offsets"), atol: refTol.atol, rtol: refTol.rtol, shape: os, "\(label): reference offsets vs torch")
            assertClose(r.y, f.double("y"), atol: refTol.atol, rtol: refTol.rtol, shape: xs, "\(label): reference y vs torch")
            assertClose(rg.gradX, f.double("grad_x"), atol: refTol.atol, rtol: refTol.rtol, shape: xs, "\(label): reference grad x vs torch")
            assertClose(rg.gradWeight, f.double("grad_weight"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad weight vs torch")
            assertClose(rg.gradBias, f.double("grad_bias"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad bias vs torch")
            assertClose(rg.gradOffsetWeight, f.double("grad_offset_weight"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad offset weight vs torch")
            assertClose(rg.gradOffsetBias, f.double("grad_offset_bias"), atol: refTol.atol, rtol: refTol.rtol, "\(label): reference grad offset bias vs torch")

            for t in [1, 2] {
                try Threads.setCount(t)
                let l = "\(label), \(t) thread(s)"
                let fast = try LayerRun(f, mode: mode)
                assertClose(fast.offsets, f.double("offsets"), atol: fastTol.atol, rtol: fastTol.rtol, shape: os, "\(l): fast offsets vs torch")
                assertClose(fast.y, f.double("y"), atol: fastTol.atol, rtol: fastTol.rtol, shape: xs, "\(l): fast y vs torch")
                assertClose(fast.gradX, f.double("grad_x"), atol: fastTol.atol, rtol: fastTol.rtol, shape: xs, "\(l): fast grad x vs torch")
                assertClose(fast.gradWeight, f.double("grad_weight"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad weight vs torch")
                assertClose(fast.gradBias, f.double("grad_bias"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad bias vs torch")
                assertClose(fast.gradOffsetWeight, f.double("grad_offset_weight"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad offset weight vs torch")
                assertClose(fast.gradOffsetBias, f.double("grad_offset_bias"), atol: fastParamTol.atol, rtol: fastParamTol.rtol, "\(l): fast grad offset bias vs torch")
            }
        }
    }
}

/// One forward and backward of `DDCLayerOps` (pointer API), gradients accumulated into zeroed arrays.
struct LayerRun {
    var y: [Float], offsets: [Float]
    var gradX: [Float], gradWeight: [Float], gradBias: [Float], gradOffsetWeight: [Float], gradOffsetBias: [Float]

    /// x, y, grad_y and grad_x are given and returned channels-first; with `layout: .channelsLast`
    /// they are transposed around the call.
    init(x: [Float], weight: [Float], bias: [Float], offsetWeight: [Float], offsetBias: [Float], gradY: [Float],
         mode: OffsetMode, shape s: DDCShape, layout: Layout = .channelsFirst, heldAxis: Int? = nil,
         workspace: Workspace = Workspace()) throws {
        let last = layout == .channelsLast
        var x = last ? toChannelsLast(x, n: s.n, c: s.c, voxels: s.voxels) : x
        var gy = last ? toChannelsLast(gradY, n: s.n, c: s.c, voxels: s.voxels) : gradY
        var weight = weight, bias = bias, ow = offsetWeight, ob = offsetBias
        y = [Float](repeating: 0, count: s.count)
        offsets = [Float](repeating: 0, count: s.offsetCount)
        try DDCLayerOps.forward(x: &x, weight: &weight, bias: &bias, offsetWeight: &ow, offsetBias: &ob, mode: mode,
                                y: &y, offsetsOut: &offsets, shape: s, layout: layout, heldAxis: heldAxis,
                                workspace: workspace)
        gradX = [Float](repeating: 0, count: s.count)
        gradWeight = [Float](repeating: 0, count: s.weightCount)
        gradBias = [Float](repeating: 0, count: s.c)
        gradOffsetWeight = [Float](repeating: 0, count: 81 * s.c)
        gradOffsetBias = [Float](repeating: 0, count: 81)
        try DDCLayerOps.backward(x: &x, weight: &weight, offsetWeight: &ow, offsetBias: &ob, mode: mode, gradY: &gy,
                                 gradX: &gradX, gradWeight: &gradWeight, gradBias: &gradBias,
                                 gradOffsetWeight: &gradOffsetWeight, gradOffsetBias: &gradOffsetBias,
                                 shape: s, layout: layout, heldAxis: heldAxis, workspace: workspace)
        if last {
            y = toChannelsFirst(y, n: s.n, c: s.c, voxels: s.voxels)
            gradX = toChannelsFirst(gradX, n: s.n, c: s.c, voxels: s.voxels)
        }
    }

    init(_ f: DDCFixture, mode: OffsetMode) throws {
        try self.init(x: f["x"], weight: f["weight"], bias: f["bias"], offsetWeight: f["offset_weight"],
                      offsetBias: f["offset_bias"], gradY: f["grad_y"], mode: mode, shape: f.shape)
    }
}
