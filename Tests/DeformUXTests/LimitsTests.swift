import XCTest
@testable import DeformUX

/// Sizes from callers are checked before any arithmetic on them (issue 6, item 3): extreme sizes give
/// errors, never a trap. Each case here trapped (overflow or index out of range) before the checks.
final class LimitsTests: XCTestCase {
    /// Runs `body`, which must throw a DeformUXError of `kind` whose text contains `words`.
    func expectError<T>(_ label: String, _ kind: DeformUXError.Kind, _ words: String = "",
                        _ body: () throws -> T) {
        do {
            _ = try body()
            XCTFail("\(label): no error")
        } catch let e as DeformUXError {
            XCTAssertEqual(e.kind, kind, "\(label): \(e)")
            XCTAssertTrue(words.isEmpty || "\(e)".contains(words), "\(label): \"\(e)\" lacks \"\(words)\"")
        } catch {
            XCTFail("\(label): \(error)")
        }
    }

    func testDDCShapeRejectsExtremeSizesBeforeAnyArithmetic() {
        let big = Int(Int32.max)
        let cases: [(String, [Int])] = [
            ("N Int.max", [Int.max, 1, 1, 1, 1]), ("C Int.max", [1, Int.max, 1, 1, 1]),
            ("D Int.max (D + 2 overflowed)", [1, 1, Int.max, 1, 1]), ("D Int.max - 1", [1, 1, Int.max - 1, 1, 1]),
            ("H Int.max - 2", [1, 1, 1, Int.max - 2, 1]), ("W Int.max", [1, 1, 1, 1, Int.max]),
            ("W 2^31", [1, 1, 1, 1, big + 1]), ("N Int.min", [Int.min, 1, 1, 1, 1]), ("D -1", [1, 1, -1, 1, 1]),
            ("W 0", [1, 1, 1, 1, 0]), ("every size 2^31 - 1 (the product overflows)", [big, big, big, big, big]),
            ("padded buffer too large", [1, 1 << 30, 1 << 11, 1 << 11, 1 << 11]),
        ]
        for (label, s) in cases {
            expectError(label, .invalidArgument, "deform_conv3d") { try DDCShape(n: s[0], c: s[1], d: s[2], h: s[3], w: s[4]) }
        }
        XCTAssertNoThrow(try DDCShape(n: 1, c: 1, d: big, h: 1, w: 1), "2^31 - 1 on one axis is a valid size")
    }

    func testVolumeAndLayoutConversionsCheckTheRankFirst() throws {
        for shape in [[], [7], [2, 3], [1, 2, 3, 4], [1, 1, 1, 1, 1, 1]] {
            let t = try Tensor(zeros: shape)
            expectError("Volume5 of \(shape)", .shapeMismatch, "rank 5") { try Volume5(t, "test") }
            expectError("toChannelsLast of \(shape)", .shapeMismatch, "to_channels_last") { try toChannelsLast(t) }
            expectError("toChannelsFirst of \(shape)", .shapeMismatch, "to_channels_first") { try toChannelsFirst(t) }
        }
        let net = try DeformUXNet(config: DeformUXNetConfig(outChannels: 2, featureSize: [4, 4, 4, 4], depths: [1, 1, 1, 1],
                                                           hiddenSize: 4))
        for shape in [[], [1], [1, 1, 16], [1, 1, 16, 16], [1, 16, 16, 16, 16, 1]] {
            expectError("validateInput \(shape)", .shapeMismatch, "rank") { try net.validateInput(shape) }
            expectError("summary \(shape)", .shapeMismatch, "rank") { try net.summary(inputShape: shape) }
            let x = try Tensor(zeros: shape)
            expectError("forward \(shape)", .shapeMismatch, "rank") { try Session(model: net).forward(x) }
        }
    }

    func testSummaryRejectsInputsTooLargeToCount() throws {
        let net = try DeformUXNet(config: DeformUXNetConfig(outChannels: 2, featureSize: [4, 4, 4, 4], depths: [1, 1, 1, 1],
                                                           hiddenSize: 4))
        let cube = 96 * 96 * 96 * 16  // summary(96**3) from Python, rounded to a multiple of 16
        let cases: [(String, [Int], DeformUXError.Kind, String)] = [
            ("batch Int.max", [Int.max, 1, 16, 16, 16], .invalidArgument, "too large"),
            ("batch 2^62", [1 << 62, 1, 96, 96, 96], .invalidArgument, "too large"),
            ("96^3 per axis", [1, 1, cube, cube, cube], .invalidArgument, "too large"),
            ("2^61 on one axis", [1, 1, 16, 16, 1 << 61], .invalidArgument, "too large"),
            ("D Int.max - 15 (a multiple of 16)", [1, 1, Int.max - 15, 16, 16], .invalidArgument, "too large"),
            ("D Int.max", [1, 1, Int.max, 16, 16], .shapeMismatch, "multiples of 16"),
            ("negative batch", [-1, 1, 16, 16, 16], .shapeMismatch, "batch"),
            ("negative D", [1, 1, -16, 16, 16], .shapeMismatch, "multiples of 16"),
        ]
        for (label, shape, kind, words) in cases {
            expectError(label, kind, words) { try net.summary(inputShape: shape) }
        }
        // Large but countable: no error, and counts that scale with the batch.
        let one = try net.summary(inputShape: [1, 1, 96, 96, 96]), many = try net.summary(inputShape: [1 << 20, 1, 96, 96, 96])
        XCTAssertEqual(many.totalMACs, one.totalMACs << 20)
    }

    func testConfigurationBoundsNameTheField() {
        let base = DeformUXNetConfig(outChannels: 2, featureSize: [4, 4, 4, 4], depths: [1, 1, 1, 1], hiddenSize: 4)
        let maxWidth = DeformUXNetConfig.maxWidth, maxDepth = DeformUXNetConfig.maxDepth
        var cases: [(String, String, (inout DeformUXNetConfig) -> Void)] = [
            ("in_channels", "in_channels", { $0.inChannels = maxWidth + 1 }), ("in_channels 0", "in_channels", { $0.inChannels = 0 }),
            ("out_channels", "out_channels", { $0.outChannels = Int.max }),
            ("feature_size", "feature_size", { $0.featureSize = [4, 4, 4, maxWidth + 1] }),
            ("feature_size negative", "feature_size", { $0.featureSize = [4, -4, 4, 4] }),
            ("depths", "depths", { $0.depths = [maxDepth + 1, 1, 1, 1] }), ("depths huge", "depths", { $0.depths = [1, 1, 1, Int.max] }),
            ("hidden_size", "hidden_size", { $0.hiddenSize = 1 << 40 }),
            ("kernel_size", "kernel_size", { $0.block = .uxnet; $0.kernelSize = DeformUXNetConfig.maxKernelSize + 2 }),
            ("kernel_size huge", "kernel_size", { $0.block = .uxnet; $0.kernelSize = (1 << 19) - 1 }),
        ]
        cases.append(("kernel_size even", "kernel_size", { $0.block = .uxnet; $0.kernelSize = 8 }))
        for (label, field, change) in cases {
            var c = base
            change(&c)
            expectError(label, .invalidArgument, field) { try c.validate() }
            expectError(label + " (model)", .invalidArgument, field) { try DeformUXNet(config: c) }
        }
        var edge = base
        edge.featureSize = [maxWidth, maxWidth, maxWidth, maxWidth]
        edge.depths = [maxDepth, maxDepth, maxDepth, maxDepth]
        edge.hiddenSize = maxWidth
        edge.block = .uxnet
        edge.kernelSize = DeformUXNetConfig.maxKernelSize
        XCTAssertNoThrow(try edge.validate(), "the bounds themselves are valid")
        // ... but such a model has far more than ParameterLayout.maxFloats parameters: refused before
        // any memory is reserved, by the running total of the layout.
        expectError("largest configuration", .invalidArgument, "configuration is too large") { try DeformUXNet(config: edge) }
    }

    func testParameterLayoutChecksEveryTensorAndTheRunningTotal() throws {
        var layout = ParameterLayout()
        _ = try layout.add("a", shape: [1 << 31])
        _ = try layout.add("b", shape: [1 << 30, 2])  // exactly maxFloats in all
        XCTAssertEqual(layout.totalCount, ParameterLayout.maxFloats)
        expectError("one more", .invalidArgument, "more than") { try layout.add("c", shape: [1]) }
        var other = ParameterLayout()
        expectError("overflowing shape", .invalidArgument, "too large") { try other.add("d", shape: [Int.max, 2]) }
        expectError("negative size", .invalidArgument, "negative") { try other.add("e", shape: [3, -1]) }
        expectError("twice", .invalidArgument, "twice") { _ = try other.add("f", shape: [1]); return try other.add("f", shape: [1]) }
    }
}
